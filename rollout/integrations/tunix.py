"""A Tunix rollout backend on the fleet: Tunix's RL cluster generates, scores and syncs through it.

    import functools, rollout
    from rollout.integrations.tunix import FleetRollout
    from tunix.rl import rl_cluster as rl

    fleet = rollout.RolloutService("Qwen/Qwen3-0.6B", num_workers=2, load_format="dummy")
    cluster = rl.RLCluster(actor=qwen3, tokenizer=tokenizer, cluster_config=rl.ClusterConfig(
        rollout_engine=functools.partial(FleetRollout, service=fleet), ...))

`FleetRollout` implements `tunix.rl.rollout.base_rollout.BaseRollout`:

- `generate(prompts, rollout_config)`: Tunix's RolloutConfig -> SamplingParams (max tokens,
  temperature, top-p, top-k, seed, EOS tokens; the pad id stops too, see `generate`), identical
  prompts of one call become one request with n samples (GRPO's repeated prompts share a prefill
  and draw distinct samples); the RolloutOutput is filled as Tunix's vanilla sampler does:
  tokens and logprobs up to (not including) the first EOS, text decoded from them, prompts
  left-padded with pad_id to max_prompt_length (the next power of two of the longest prompt if
  that is longer).
- `get_per_token_logps(prompt_tokens, completion_tokens)`: the fleet's scoring API on Tunix's
  padded batches, with every pad position dropped as Tunix's masks do (zeros there), at
  temperature 1 as Tunix's own backends.
- `update_params(params)`: the parameter tree of Tunix's Qwen3 (an nnx.State, as RLCluster
  passes it) mapped to the engine's names (`tunix_names`) with the strict checks of a sync, then
  `sync_weights`. A tree with qwix LoRA leaves (or filter_types=nnx.LoRAParam) syncs only the
  adapter (`tunix_lora`; give FleetRollout the LoraProvider's `lora_alpha`). Each sync and the versions of each generate call are logged as JSON lines on
  the `rollout.integrations.tunix` logger and kept in `history`.
- `pad_id()`, `eos_id()`: Tunix's tokenizer's (as its backends), else the served checkpoint's.
- `model()`: None, as Tunix's vLLM and sglang-jax backends: the weights live on the fleet, so
  Tunix's learner always syncs after each update.

Importing this module does not import Tunix (that takes seconds and pulls in Tunix's own
dependencies); `FleetRollout` is made on first access.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rollout.engine.sampling_params import SamplingParams
from rollout.integrations.tunix_names import tunix_to_engine

if TYPE_CHECKING:
    from rollout.coordinator.service import RolloutService

log = logging.getLogger("rollout.integrations.tunix")
TUNIX_QWEN3_ROPE_THETA = 1_000_000.0  # what tunix.models.qwen3 applies, whatever its config says
__all__ = ["FleetRollout",  # noqa: F822 - made by the module __getattr__ on first access (imports Tunix)
           "FleetTokenizer", "load_tunix_qwen3", "sampling_params", "tunix_qwen3_config"]


class FleetTokenizer:
    """The served checkpoint's tokenizer in the shape Tunix's TokenizerAdapter accepts (encode,
    decode, bos_id, eos_id, pad_id), for a Tunix setup without transformers' tokenizers."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=kwargs.get("skip_special_tokens", False))

    def bos_id(self) -> int | None:
        return None  # Qwen prompts start without a BOS token

    def eos_id(self) -> int:
        return self._tok.eos_token_ids[0]

    def pad_id(self) -> int:
        pad = self._tok.pad_token_id
        return self.eos_id() if pad is None else pad


def sampling_params(config: Any, eos_ids: Sequence[int], n: int = 1) -> SamplingParams:
    """Tunix RolloutConfig -> SamplingParams. Tunix stops at `eos_tokens` (else the tokenizer's
    EOS) only, so the checkpoint's own EOS list is not added (ignore_eos) and the stop ids are
    exactly those."""
    top_k = config.top_k if config.top_k is not None and config.top_k > 0 else 0
    top_p = 1.0 if config.top_p is None else float(config.top_p)
    return SamplingParams(
        max_tokens=int(config.max_tokens_to_generate),
        temperature=float(config.temperature),
        top_p=top_p,
        top_k=int(top_k),
        n=n,
        seed=_seed(config.seed),
        stop_token_ids=tuple(int(t) for t in eos_ids),
        ignore_eos=True,
    )


def _seed(seed: Any) -> int | None:
    """None, an int, or a jax PRNG key (typed or raw uint32 data) -> a seed in [0, 2**31)."""
    if seed is None:
        return None
    if isinstance(seed, (int, np.integer)):
        return int(seed) % 2**31
    import jax

    data = seed
    if hasattr(seed, "dtype") and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(seed)
    words = np.asarray(data).astype(np.uint64).ravel()
    mixed = 0
    for word in words:
        mixed = (mixed * 0x9E3779B1 + int(word)) % 2**61
    return mixed % 2**31


class _FleetRolloutImpl:
    """The methods of FleetRollout (which adds Tunix's BaseRollout as a base on first access)."""

    def __init__(
        self,
        rollout_actor: Any = None,
        tokenizer: Any = None,
        mesh: Any = None,
        rollout_config: Any = None,
        *,
        service: RolloutService,
        sync_initial_weights: bool = True,
        timeout: float | None = None,
        lora_alpha: float | None = None,
        **unused: Any,
    ):
        """RLCluster calls this with rollout_actor, tokenizer, mesh and rollout_config; bind the
        fleet with functools.partial(FleetRollout, service=...). The fleet starts serving the
        actor's weights (`sync_initial_weights`), so it may be started with load_format="dummy"."""
        del mesh, rollout_config, unused  # the fleet has its own devices and takes configs per call
        self.service = service
        self._tokenizer = tokenizer
        self._timeout = timeout
        self._lora_alpha = lora_alpha  # qwix's LoraProvider alpha, for LoRA syncs (tunix_lora)
        self._lock = threading.Lock()
        self.history: list[dict[str, Any]] = []  # one entry per sync, generate and score call
        if sync_initial_weights and rollout_actor is not None:
            from flax import nnx

            self.update_params(nnx.state(rollout_actor, nnx.Param))

    # -- BaseRollout ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], rollout_config: Any, **kwargs: Any) -> Any:
        from tunix.rl.rollout.base_rollout import RolloutOutput

        if isinstance(prompts, str):
            prompts = [prompts]
        eos = list(rollout_config.eos_tokens or [self.eos_id()])
        # A pad id inside a completion would be invisible to Tunix's trainer (its masks drop every
        # pad position), so sampling would not be what it trains on: a completion ends at the pad
        # id as at EOS (for Qwen it is <|endoftext|>, an EOS of the checkpoint anyway).
        stops = [*eos, *([self.pad_id()] if self.pad_id() not in eos else [])]
        ids = [self._encode(p) for p in prompts]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, prompt in enumerate(ids):
            groups.setdefault(tuple(prompt), []).append(index)
        # One request per distinct prompt, with n = its repeats: GRPO repeats each prompt
        # num_generations times; as one request they share a prefill and get distinct samples.
        by_n: dict[int, list[tuple[int, ...]]] = {}
        for key, where in groups.items():
            by_n.setdefault(len(where), []).append(key)
        streams = [
            (prompts_n, self.service.generate_async(
                [list(p) for p in prompts_n], sampling_params(rollout_config, stops, n), timeout=self._timeout))
            for n, prompts_n in by_n.items()
        ]
        completions: list[Any] = [None] * len(ids)
        for prompts_n, stream in streams:
            for group in stream.groups():
                for completion in group:
                    completions[groups[prompts_n[completion.prompt_index]][completion.sample_index]] = completion
        tokens, logprobs = [], []
        eos_set = set(stops)
        for completion in completions:
            cut = next((i for i, t in enumerate(completion.token_ids) if t in eos_set), len(completion.token_ids))
            tokens.append(np.asarray(completion.token_ids[:cut], np.int32))
            logprobs.append(np.asarray(completion.logprobs[:cut], np.float32))
        width = max(int(rollout_config.max_prompt_length), 1)
        longest = max(len(p) for p in ids)
        if longest > width:
            width = 1 << (longest - 1).bit_length()  # as Tunix's samplers: the next power of two
        padded = np.full((len(ids), width), self.pad_id(), np.int32)
        for row, prompt in enumerate(ids):
            padded[row, width - len(prompt):] = prompt
        versions = sorted({c.weight_version for c in completions})
        self._record("generate", versions=versions, prompts=len(ids), requests=len(groups))
        return RolloutOutput(
            text=[self._decode(t) for t in tokens],
            logits=None,
            tokens=tokens,
            left_padded_prompt_tokens=padded,
            logprobs=logprobs if rollout_config.return_logprobs else None,
        )

    def get_per_token_logps(self, prompt_tokens: Any, completion_tokens: Any, *args: Any, **kwargs: Any) -> Any:
        import jax
        import jax.numpy as jnp

        pad = self.pad_id()
        with jax.transfer_guard("allow"):
            prompt_rows, completion_rows = np.asarray(prompt_tokens), np.asarray(completion_tokens)
        # Tunix's masks drop every pad position (attention and positions alike), so the model
        # sees each row without its pads: score exactly that, and put the numbers back in place.
        prompts = [[int(t) for t in row if t != pad] for row in prompt_rows]
        kept = [np.flatnonzero(row != pad) for row in completion_rows]
        completions = [[int(t) for t in row[where]] for row, where in zip(completion_rows, kept)]
        scores = self.service.score(prompts, completions, timeout=self._timeout)
        out = np.zeros(completion_rows.shape, np.float32)
        for row, (where, values) in enumerate(zip(kept, scores.logprobs)):
            out[row, where] = values
        self._record("score", version=scores.weight_version, rows=len(prompts))
        with jax.transfer_guard("allow"):
            return jnp.asarray(out)

    def update_params(self, params: Any, filter_types: Any = None) -> None:
        import jax
        from flax import nnx

        from rollout.integrations.tunix_lora import lora_leaves, qwix_lora_adapter

        start = time.perf_counter()
        with jax.transfer_guard("allow"):
            lora = lora_leaves(params)
        if lora or (filter_types is not None and any(t is getattr(nnx, "LoRAParam", None) for t in filter_types)):
            # qwix LoRA: only the adapter is synced; the fleet merges it onto its base (the
            # frozen weights it loaded or was last synced in full)
            if self._lora_alpha is None:
                raise ValueError(
                    "a LoRA update needs the adapter's alpha: pass lora_alpha= (qwix LoraProvider's alpha) "
                    "to FleetRollout, e.g. functools.partial(FleetRollout, service=fleet, lora_alpha=16.0)"
                )
            with jax.transfer_guard("allow"):
                adapter = qwix_lora_adapter(lora, self.service.spec, self._lora_alpha)
            mapped = time.perf_counter()
            version = self.service.sync_weights(adapter)
            self._record("sync", version=version, leaves=len(lora), lora=True, map_s=round(mapped - start, 4),
                         sync_s=round(time.perf_counter() - mapped, 4))
            return
        # RLCluster.sync_weights forbids host transfers on CPU; the fleet lives in other
        # processes, so this sync must fetch the trainer's arrays to the host.
        with jax.transfer_guard("allow"):
            flat = tunix_to_engine(params, self.service.spec, self.service.model_config)
        mapped = time.perf_counter()
        version = self.service.sync_weights(flat)
        self._record(
            "sync", version=version, leaves=len(flat), map_s=round(mapped - start, 4),
            sync_s=round(time.perf_counter() - mapped, 4),
        )

    def pad_id(self) -> int:
        if self._tokenizer is not None:
            return int(self._tokenizer.pad_id())
        return FleetTokenizer(self.service.tokenizer).pad_id()

    def eos_id(self) -> int:
        if self._tokenizer is not None:
            return int(self._tokenizer.eos_id())
        return FleetTokenizer(self.service.tokenizer).eos_id()

    def model(self) -> None:
        return None

    # -- helpers --------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The fleet's committed weight version."""
        return self.service.version

    def _encode(self, prompt: Any) -> list[int]:
        """As Tunix's samplers: the tokenizer's BOS (if it has one) + encode(prompt)."""
        if isinstance(prompt, np.ndarray):  # Tunix's data pipeline hands over numpy strings
            prompt = prompt.item()
        prompt = str(prompt)
        if self._tokenizer is None:
            return self.service.tokenizer.encode(prompt)
        ids = list(self._tokenizer.encode(prompt))
        bos = self._tokenizer.bos_id()
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return [int(t) for t in ids]

    def _decode(self, tokens: np.ndarray) -> str:
        if self._tokenizer is None:
            return self.service.tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
        return self._tokenizer.decode(tokens.tolist())

    def _record(self, event: str, **fields: Any) -> None:
        entry = {"event": f"tunix_{event}", **fields}
        with self._lock:
            self.history.append(entry)
        log.info(json.dumps(entry))


_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    """`FleetRollout`: _FleetRolloutImpl with Tunix's BaseRollout as a base (imports Tunix)."""
    global _CLASS
    if name != "FleetRollout":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _CLASS is None:
        try:
            from tunix.rl.rollout.base_rollout import BaseRollout
        except ImportError as err:
            raise ImportError(
                "rollout.integrations.tunix.FleetRollout needs Tunix: pip install 'rollout[tunix]' "
                f"(google-tunix); importing it failed: {err}"
            ) from err
        _CLASS = type("FleetRollout", (_FleetRolloutImpl, BaseRollout), {"__module__": __name__,
                                                                          "__doc__": _FleetRolloutImpl.__doc__})
    return _CLASS


def tunix_qwen3_config(config: Any, **overrides: Any) -> Any:
    """The served model's config (rollout.models.config.ModelConfig) as Tunix's Qwen3
    ModelConfig, e.g. to build the trainer's model for a checkpoint the fleet serves."""
    from tunix.models.qwen3 import model as qwen3

    if not config.qk_norm or config.qkv_bias:
        raise ValueError(
            f"Tunix's Qwen3 is the dense Qwen3 (qk-norm, no q/k/v bias); the checkpoint is {config.architecture}"
        )
    if config.rope_theta != TUNIX_QWEN3_ROPE_THETA:
        # Tunix's Qwen3 (0.1.7) calls apply_rope without its config's rope_theta: trainer and
        # fleet would compute different models, and the trainer's logprobs would not be ours.
        raise ValueError(
            f"the checkpoint's rope_theta is {config.rope_theta}, but Tunix's Qwen3 always applies RoPE "
            f"with theta {TUNIX_QWEN3_ROPE_THETA:g} (its ModelConfig.rope_theta is not used); use a "
            "checkpoint with rope_theta 1e6, as every released Qwen3 has"
        )
    return qwen3.ModelConfig(
        num_layers=config.num_layers, vocab_size=config.vocab_size, embed_dim=config.hidden_size,
        hidden_dim=config.intermediate_size, num_heads=config.num_heads, head_dim=config.head_dim,
        num_kv_heads=config.num_kv_heads, rope_theta=int(config.rope_theta), norm_eps=config.rms_norm_eps,
        use_tied_embedding=config.tie_word_embeddings, **overrides,
    )


def load_tunix_qwen3(checkpoint: Any, mesh: Any, **overrides: Any) -> Any:
    """Tunix's Qwen3 (an nnx.Module on `mesh`, axes "fsdp" and "tp") with the weights of an HF
    checkpoint directory, through Tunix's own safetensors loader."""
    from tunix.models.qwen3 import params as qwen3_params

    from rollout.models.config import ModelConfig
    from rollout.weights.loader import resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    config = tunix_qwen3_config(ModelConfig.from_pretrained(directory), **overrides)
    return qwen3_params.create_model_from_safe_tensors(str(directory), config, mesh)
