"""token_logprobs: per-token logprobs (and activations) of whole sequences, as a trainer needs them.

A pure, differentiable JAX function of the flat parameter dict (`jax.grad` goes through it), from
the same model code the engine serves with. With `batch_invariant=True` (the default) it traces
the model in batch-invariant mode (rollout.models.invariant), and its numbers are bit for bit
those of an engine with `EngineConfig(batch_invariant=True)` on the same weights and device
count: `generate`'s logprobs of the tokens it sampled, and `score`'s, for any batch of
sequences. The engine's scorer runs this very function in that mode.

The logprob of token t+1 is `log_softmax(logits_t / temperature)[token]`, computed as the
sampler does (rollout.engine.native.sampling): logits shifted by their row maximum, divided by
the temperature, minus the log of the sum of their exponentials.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from rollout.models import forward, invariant
from rollout.models.bind import ModelDef

Array = jax.Array


def logprobs_of(logits: Array, targets: Array, temperature: Array | float = 1.0) -> Array:
    """logits (..., V) float32, targets (...) -> log_softmax(logits / temperature)[targets],
    by the sampler's arithmetic (see the module docstring)."""
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    picked = jnp.take_along_axis(scaled, targets[..., None], axis=-1)[..., 0]
    return picked - jnp.log(invariant.row_sum(jnp.exp(scaled)))


def token_logprobs(
    model_def: ModelDef,
    params: Mapping[str, Array],
    tokens: Array,
    lengths: Array | None = None,
    *,
    temperature: Array | float = 1.0,
    batch_invariant: bool = True,
) -> Array:
    """Teacher-forced logprobs of right-padded sequences.

    tokens (B, L) int, right-padded; lengths (B,) real lengths (None: all L). Returns (B, L)
    float32 whose column t is the logprob of tokens[:, t + 1] after tokens[:, : t + 1] (the
    last real column of a row, and padding, are meaningless). Jit it with the model definition
    bound, e.g. `jax.jit(functools.partial(token_logprobs, model_def))`.
    """
    return token_logprobs_and_hidden(
        model_def, params, tokens, lengths, temperature=temperature, batch_invariant=batch_invariant
    )[0]


def token_logprobs_and_hidden(
    model_def: ModelDef,
    params: Mapping[str, Array],
    tokens: Array,
    lengths: Array | None = None,
    *,
    temperature: Array | float = 1.0,
    hidden_layers: Sequence[int] = (),
    batch_invariant: bool = True,
) -> tuple[Array, Array]:
    """`token_logprobs`, and from the same forward the residual stream at `hidden_layers`,
    (len(hidden_layers), B, L, hidden), indexed as transformers' `output_hidden_states` (0: the
    embeddings, i: after layer i, num_layers: after the final norm). Dense models."""
    b, length = tokens.shape
    if lengths is None:
        lengths = jnp.full((b,), length, jnp.int32)
    with invariant.enabled(batch_invariant):
        if batch_invariant:
            invariant.check_supported(model_def.config)
        model = model_def.bind(dict(params))
        real = jnp.arange(length)[None, :] < lengths[:, None]
        mask = forward.causal_padding_mask(real)
        positions = jnp.broadcast_to(jnp.arange(length)[None, :], (b, length))
        states: list[Array] = []
        h = model.hidden(
            tokens,
            positions,
            lambda i, q, k, v: forward.attention(q, forward.head_major(k), forward.head_major(v), mask),
            None,
            **({"states": states} if hidden_layers else {}),
        )
        logprobs = logprobs_of(model.logits(h), jnp.roll(tokens, -1, axis=1), temperature)
    hidden = (
        select_layers(states, h, model_def.config.num_layers, hidden_layers)
        if hidden_layers
        else jnp.zeros((0, b, length, model_def.config.hidden_size), h.dtype)
    )
    return logprobs, hidden


def select_layers(states: Sequence[Array], final: Array, num_layers: int, layers: Sequence[int]) -> Array:
    """The residual streams at `layers` (transformers' indexing: 0 embeddings, i after layer i,
    num_layers the final norm's output) from `states` (the input of each layer) and `final`."""
    out = []
    for i in layers:
        if not -(num_layers + 1) <= i <= num_layers:
            raise ValueError(f"hidden layer {i} out of range: the model has layers 0..{num_layers} (0 = embeddings)")
        i = i % (num_layers + 1)
        out.append(final if i == num_layers else states[i])
    return jnp.stack(out)
