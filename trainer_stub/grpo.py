"""The GRPO-style policy-gradient step.

For each prompt the rollout returns a group of n samples. Each sample's advantage is its reward
normalized within its group, (r - mean) / (std + eps), so only the ranking inside a group
matters and no value network is needed. The loss is

    loss = - sum_{b,t} A_b * log pi(x_{b,t} | x_{b,<t}) * m_{b,t} / sum_{b,t} m_{b,t}

with m the mask of completion tokens: the mean over all completion tokens of the batch of
advantage times logprob, under a full-sequence forward of prompt + completion (right-padded).

Truncated importance sampling (TIS, `tis_cap`; as verl's `tis_imp_ratio_cap` and slime's TIS):
when the rollout samples from a slightly different distribution than the trainer's (an int8 or
bfloat16 rollout engine), each token's term is weighted by the ratio of the trainer's
probability to the rollout's, truncated at the cap and held constant (no gradient through it):

    w_{b,t} = stop_gradient(min(exp(log pi(x_{b,t}) - log pi_rollout(x_{b,t})), cap))

so the gradient is that of the trainer's policy, with the variance a cap bounds.
The same forward returns the per-token logprobs under the pre-update parameters, which the loop
compares with the rollout's logprobs (same parameters, so they must agree).

Mixture-of-experts models (routing replay): when the rollout returned each sample's routed
experts, the batch carries them, and every MoE layer of the trainer's forward uses the rollout's
experts instead of its own router's choice (rollout.models.moe.RouteRecorder, the forward the
engine's scorer replays with), so the recomputed logprobs, and the gradient, are those of the
routes that sampled the tokens. The router still gets gradients through the routing weights
(the router's probabilities at the replayed experts).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rollout.models import forward
from rollout.models.bind import ModelDef
from rollout.models.logprobs import token_logprobs as invariant_token_logprobs
from rollout.models.moe import RouteRecorder

Params = dict[str, jax.Array]


def group_advantages(rewards: np.ndarray, group_ids: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(r - mean of its group) / (std of its group + eps); a group of equal rewards gets zeros.

    >>> group_advantages(np.array([1.0, 0.0, 0.5, 0.5]), np.array([0, 0, 1, 1])).round(3).tolist()
    [1.0, -1.0, 0.0, 0.0]
    """
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for g in np.unique(group_ids):
        idx = group_ids == g
        r = rewards[idx]
        out[idx] = (r - r.mean()) / (r.std() + eps)
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Batch:
    """Host arrays for one update. B = prompts x group size, L = padded sequence length."""

    tokens: np.ndarray  # (B, L) int32, prompt + completion, right-padded with 0
    attention_mask: np.ndarray  # (B, L) int32, 1 on real tokens
    target_mask: np.ndarray  # (B, L-1) float32, 1 where tokens[:, 1:] is a completion token
    advantages: np.ndarray  # (B,) float32
    rollout_logprobs: np.ndarray  # (B, L-1) float32, the rollout's logprobs at the target positions
    # MoE routing replay (None: dense, or no routes returned): the rollout's experts at every fed
    # position, and where to replay them (False on padding and on each row's last token)
    routes: np.ndarray | None = None  # (B, L, MoE layers, top_k) int32
    replay: np.ndarray | None = None  # (B, L) bool

    @property
    def num_tokens(self) -> int:
        return int(self.target_mask.sum())


def make_batch(completions: Sequence[Any], advantages: np.ndarray, pad_to: int) -> Batch:
    """Right-pad prompt + completion of each Completion to `pad_to` tokens.

    A fixed `pad_to` keeps the jitted step at one compiled shape for the whole run. Completions
    that carry `routed_experts` (all of them or none) give the batch its routes to replay.
    """
    b = len(completions)
    with_routes = [c.routed_experts is not None for c in completions]
    routes = replay = None
    if any(with_routes):
        if not all(with_routes):
            raise ValueError("some completions carry routed_experts and some do not; ask for them on every sample")
        layers_k = next(c.routed_experts.shape[1:] for c in completions if c.routed_experts.size)
        routes = np.zeros((b, pad_to, *layers_k), np.int32)
        replay = np.zeros((b, pad_to), bool)
    tokens = np.zeros((b, pad_to), np.int32)
    attention_mask = np.zeros((b, pad_to), np.int32)
    target_mask = np.zeros((b, pad_to - 1), np.float32)
    rollout_logprobs = np.zeros((b, pad_to - 1), np.float32)
    for i, c in enumerate(completions):
        prompt, completion = list(c.prompt_token_ids), list(c.token_ids)
        n, m = len(prompt), len(completion)
        if n + m > pad_to:
            raise ValueError(f"sample {i} has {n} + {m} tokens, more than pad_to={pad_to}; raise pad_to")
        tokens[i, : n + m] = prompt + completion
        attention_mask[i, : n + m] = 1
        # Target position t predicts tokens[t + 1]; completion token j sits at n + j.
        target_mask[i, n - 1 : n - 1 + m] = 1.0
        if c.logprobs is not None:
            rollout_logprobs[i, n - 1 : n - 1 + m] = c.logprobs
        if routes is not None and replay is not None:
            fed = n + m - 1  # every position but the last token was fed through the model
            routes[i, :fed] = c.routed_experts
            replay[i, :fed] = True
    return Batch(tokens, attention_mask, target_mask, np.asarray(advantages, np.float32), rollout_logprobs,
                 routes, replay)


def token_logprobs(
    model_def: ModelDef,
    params: Params,
    tokens: jax.Array,
    attention_mask: jax.Array,
    temperature: float = 1.0,
    routes: jax.Array | None = None,
    replay: jax.Array | None = None,
    batch_invariant: bool = False,
) -> jax.Array:
    """Logprob of each next token under log_softmax(logits / temperature): (B, L-1).

    `batch_invariant`: by `rollout.models.token_logprobs` in batch-invariant mode, bit for bit
    the logprobs of a rollout engine with batch_invariant=True (dense models).

    The rollout reports logprobs of the distribution it sampled from, log_softmax(logits / T),
    so the recompute divides by the same temperature. `routes` (B, L, MoE layers, k) with
    `replay` (B, L): experts each MoE layer uses where replay is True (see the module docstring).
    """
    if batch_invariant:  # the engine's batch-invariant numbers, bit for bit (right-padded rows)
        lengths = attention_mask.astype(jnp.int32).sum(axis=-1)
        logp = invariant_token_logprobs(model_def, params, tokens, lengths, temperature=temperature)
        return logp[:, :-1]
    route = None if routes is None else RouteRecorder(model_def.config.num_experts_per_tok, routes, replay)
    logits = forward.forward_full(model_def.bind(params), tokens, attention_mask, route)  # (B, L, V) f32
    logp = jax.nn.log_softmax(logits[:, :-1] / temperature, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def tis_weights(logp: jax.Array, rollout_logprobs: jax.Array, cap: float) -> jax.Array:
    """min(pi_trainer / pi_rollout, cap) per token, without gradient (see the module docstring).

    >>> tis_weights(jnp.log(jnp.array([0.5, 0.9, 0.1])), jnp.log(jnp.array([0.5, 0.3, 0.2])), 2.0).round(3).tolist()
    [1.0, 2.0, 0.5]
    """
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(logp - rollout_logprobs), cap))


def pg_loss(
    model_def: ModelDef, params: Params, batch: dict[str, jax.Array], temperature: float,
    batch_invariant: bool = False, tis_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(loss, per-token logprobs (B, L-1)) of one batch; see the module docstring. With
    `tis_cap`, `batch["rollout_logprobs"]` weights each token (truncated importance sampling)."""
    logp = token_logprobs(model_def, params, batch["tokens"], batch["attention_mask"], temperature,
                          batch.get("routes"), batch.get("replay"), batch_invariant)
    mask = batch["target_mask"]
    if tis_cap is not None:
        mask = mask * tis_weights(logp, batch["rollout_logprobs"], tis_cap)
        # the mean stays over completion tokens, not over the weights
    weighted = batch["advantages"][:, None] * logp * mask
    loss = -weighted.sum() / jnp.maximum(batch["target_mask"].sum(), 1.0)
    return loss, logp


TrainStep = Callable[[Params, Any, dict[str, np.ndarray]], tuple[Params, Any, dict[str, jax.Array]]]


def make_optimizer(learning_rate: float, max_grad_norm: float = 1.0) -> optax.GradientTransformation:
    """Adam with global-norm clipping (the clip keeps an unlucky batch from wrecking a tiny model)."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate))


def make_train_step(
    model_def: ModelDef, optimizer: optax.GradientTransformation, temperature: float = 1.0,
    batch_invariant: bool = False,
    tis_cap: float | None = None,
) -> TrainStep:
    """A jitted `step(params, opt_state, batch) -> (new_params, opt_state, metrics)`.

    `batch` is `batch_arrays(Batch)`. metrics["logprobs"] (B, L-1) are the token logprobs under
    the params passed in (before the update), i.e. the weights that should have generated them.
    """

    def step(params: Params, opt_state: Any, batch: dict[str, jax.Array]):
        (loss, logp), grads = jax.value_and_grad(
            lambda p: pg_loss(model_def, p, batch, temperature, batch_invariant, tis_cap), has_aux=True
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "logprobs": logp}
        return params, opt_state, metrics

    return jax.jit(step)


def on_trainer_device(state: Any) -> Any:
    """`state` (params, optimizer state, LoRA factors) committed to the trainer's device.

    The jitted step's outputs are committed arrays; an input that is not (optax's step count,
    arrays made by jnp.zeros) is another jit cache key, so without this the second step would
    compile the whole step again (seconds on CPU).
    """
    return jax.device_put(state, jax.local_devices()[0])


def train_step_for(
    model_def: ModelDef, learning_rate: float, temperature: float = 1.0, max_grad_norm: float = 1.0,
    batch_invariant: bool = False,
    tis_cap: float | None = None,
) -> tuple[optax.GradientTransformation, TrainStep]:
    """(optimizer, jitted step) for a model and hyperparameters, built once per process.

    jax caches executables per function object, so a fresh `make_train_step` compiles again;
    keyed by the (hashable) model config, repeated loops in one process (tests, sweeps) share one.
    """
    return _train_step_for(model_def.config, str(model_def.dtype), learning_rate, temperature, max_grad_norm,
                           batch_invariant, tis_cap)


@functools.lru_cache(maxsize=8)
def _train_step_for(
    config: Any, dtype: str, learning_rate: float, temperature: float, max_grad_norm: float, batch_invariant: bool,
    tis_cap: float | None,
):
    optimizer = make_optimizer(learning_rate, max_grad_norm)
    return optimizer, make_train_step(ModelDef.create(config, dtype), optimizer, temperature, batch_invariant, tis_cap)


def batch_arrays(batch: Batch, rollout_logprobs: bool = False) -> dict[str, np.ndarray]:
    """The arrays of `batch` the jitted step reads (the routes to replay, when it has them; the
    rollout's logprobs with `rollout_logprobs`, for TIS)."""
    arrays = {
        "tokens": batch.tokens,
        "attention_mask": batch.attention_mask,
        "target_mask": batch.target_mask,
        "advantages": batch.advantages,
    }
    if batch.routes is not None and batch.replay is not None:
        arrays.update(routes=batch.routes, replay=batch.replay)
    if rollout_logprobs:
        arrays["rollout_logprobs"] = batch.rollout_logprobs
    return arrays


def unreplayed_logprobs(model_def: ModelDef, params: Params, batch: Batch, temperature: float = 1.0) -> np.ndarray:
    """The trainer's logprobs (B, L-1) with its own router's choice of experts (no replay):
    what a MoE trainer recomputes without routing replay, for comparison."""
    fn = _unreplayed_fn(model_def.config, str(model_def.dtype), temperature)
    return np.asarray(fn(params, batch.tokens, batch.attention_mask))


@functools.lru_cache(maxsize=8)
def _unreplayed_fn(config: Any, dtype: str, temperature: float) -> Callable[..., jax.Array]:
    model_def = ModelDef.create(config, dtype)
    return jax.jit(lambda params, tokens, mask: token_logprobs(model_def, params, tokens, mask, temperature))


def logprob_diff(batch: Batch, trainer_logprobs: np.ndarray) -> tuple[float, float]:
    """(mean, max) absolute difference between trainer and rollout logprobs over completion tokens."""
    mask = batch.target_mask > 0
    diff = np.abs(np.asarray(trainer_logprobs, np.float64) - batch.rollout_logprobs)[mask]
    if diff.size == 0:
        return 0.0, 0.0
    return float(diff.mean()), float(diff.max())
