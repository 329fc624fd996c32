"""The forward passes every family shares, and the KV cache they read and write.

- `forward_full`: all-position logits of a padded batch (scoring, training, logprob checks);
- `prefill`: a batch of right-padded prompts, writing their K/V into cache slots;
- `decode`: one token for each of a batch of cache slots, attending over each slot's cached K/V.

They need two methods of a family's model (see `CausalLM`): `hidden(tokens, positions, attend,
route)` runs the decoder stack, calling `attend(layer, q, k, v)` for each layer's attention and,
in a mixture-of-experts model, `route(moe_layer, probs)` to pick each token's experts
(rollout.models.moe: a `RouteRecorder` records them or replays given ones), and
`logits(h, head_t)` projects hidden states to the vocabulary. The KV cache lives outside the
model (see `init_cache`), so the engine owns its lifetime and the jitted functions can take
parameters and cache as plain arguments. The attention softmax runs in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

from rollout.models import invariant
from rollout.models.config import ModelConfig
from rollout.models.moe import RouteFn

Array = jax.Array
# (k, v) per layer, each (slots, kv_heads, max_seq_len, head_dim): head-major, so attention over
# the cache reads each head's keys contiguously with no transpose
KVCache = tuple[tuple[Array, Array], ...]
# attend(layer_index, q, k, v) -> attention output (B, T, H, D); it may record K/V into a cache.
AttendFn = Callable[[int, Array, Array, Array], Array]
_MASKED = -1e30


class CausalLM(Protocol):
    """What the forwards need of a family's model."""

    def hidden(self, tokens: Array, positions: Array, attend: AttendFn, route: RouteFn | None = None) -> Array:
        """tokens, positions (B, T) -> final hidden states (B, T, hidden); q (B, T, H, D), k and
        v (B, T, KVH, D) go through `attend` for each layer; each MoE layer's router
        probabilities through `route` (None: the router's top k)."""
        ...

    def logits(self, h: Array, head_t: Array | None = None) -> Array:
        """h (..., hidden) -> float32 logits (..., vocab); `head_t`: a (hidden, vocab) output
        projection to use instead of the model's own (a transposed tied embedding)."""
        ...


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention.

    q (B, T, H, D); k, v (B, KVH, S, D) head-major, as the KV cache holds them; mask (B, T, S)
    True where a query may attend. Returns (B, T, H, D). Softmax in float32.
    """
    if invariant.active():
        return invariant.attention(q, k, v, mask)
    b, t, h, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def decode_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """`attention` for one query per row (T == 1), as multiply-reduce loops.

    q (B, 1, H, D); k, v (B, KVH, S, D); mask (B, 1, S). Same math as `attention`; at decode
    shapes (a (G, D) x (D, S) product per row and KV head) XLA:CPU fuses these loops with the
    cache read, where the batched dots first copy each row's keys (measured on the 75M bench
    model: 8 decode steps at batch 16 took 115 ms this way, 130 ms with `attention`). Float32
    softmax.
    """
    if invariant.active():
        return invariant.attention(q, k, v, mask)
    b, _, h, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, d).astype(jnp.float32)
    scores = jnp.sum(qg[:, :, :, None, :] * k[:, :, None, :, :].astype(jnp.float32), axis=-1)  # (B, KVH, G, S)
    scores = jnp.where(mask[:, None], scores * (d**-0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.sum(probs[..., None] * v[:, :, None, :, :], axis=-2)  # (B, KVH, G, D)
    return out.reshape(b, 1, h, d)


def head_major(x: Array) -> Array:
    """(B, T, KVH, D) projections -> (B, KVH, T, D), the layout of `attention`'s keys and values."""
    return x.transpose(0, 2, 1, 3)


def causal_padding_mask(attention_mask: Array) -> Array:
    """attention_mask (B, T) of 1/0 -> (B, T, T): causal, keys restricted to real tokens."""
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def positions_from_mask(attention_mask: Array) -> Array:
    """Positions count real tokens only, so left padding does not shift RoPE."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward_full(model: CausalLM, tokens: Array, attention_mask: Array, route: RouteFn | None = None) -> Array:
    """tokens, attention_mask (B, T) -> float32 logits (B, T, vocab) at every position."""
    mask = causal_padding_mask(attention_mask)
    positions = positions_from_mask(attention_mask)
    h = model.hidden(tokens, positions, lambda i, q, k, v: attention(q, head_major(k), head_major(v), mask), route)
    return model.logits(h)


def init_cache(cfg: ModelConfig, slots: int, max_seq_len: int, dtype: jnp.dtype) -> KVCache:
    shape = cache_shape(cfg, slots, max_seq_len)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def cache_shape(cfg: ModelConfig, slots: int, max_seq_len: int) -> tuple[int, int, int, int]:
    return (slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)


def prefill(
    model: CausalLM,
    cache: KVCache,
    tokens: Array,
    lengths: Array,
    dst_slots: Array,
    src_rows: Array,
    head_t: Array | None = None,
    route: RouteFn | None = None,
) -> tuple[Array, KVCache]:
    """Run right-padded prompts and write their K/V into cache slots.

    tokens (B, P) right-padded; lengths (B,) real lengths (0 for padding rows).
    dst_slots, src_rows (M,): cache slot dst_slots[m] receives the K/V of prompt src_rows[m], so
    the n samples of one prompt share one prefill. Out-of-range dst_slots are dropped (padding).
    Returns the float32 logits at each prompt's last real token (B, vocab) and the new cache.
    `head_t`: see `CausalLM.logits`; `route`: see `CausalLM.hidden`.
    """
    b, p = tokens.shape
    real = jnp.arange(p)[None, :] < lengths[:, None]  # (B, P)
    mask = causal_padding_mask(real)
    positions = jnp.broadcast_to(jnp.arange(p)[None, :], (b, p))
    new_cache = list(cache)

    def attend(i: int, q: Array, k: Array, v: Array) -> Array:
        k, v = head_major(k), head_major(v)
        kc, vc = new_cache[i]
        kc = kc.at[dst_slots, :, :p].set(k[src_rows].astype(kc.dtype), mode="drop")
        vc = vc.at[dst_slots, :, :p].set(v[src_rows].astype(vc.dtype), mode="drop")
        new_cache[i] = (kc, vc)
        return attention(q, k, v, mask)

    h = model.hidden(tokens, positions, attend, route)
    last = h[jnp.arange(b), jnp.maximum(lengths - 1, 0)]  # (B, hidden)
    return model.logits(last, head_t), tuple(new_cache)


def decode(
    model: CausalLM,
    cache: KVCache,
    slot_ids: Array,
    tokens: Array,
    positions: Array,
    kv_len: int,
    head_t: Array | None = None,
    in_place: bool = False,
    route: RouteFn | None = None,
) -> tuple[Array, KVCache]:
    """One step for a batch of cache slots.

    slot_ids, tokens, positions (B,): which cache slot each row decodes, the token it feeds and
    that token's position. Rows whose slot id or position is out of range are padding: their
    writes are dropped and their outputs are meaningless. Attention covers cache[slot, :, :kv_len]
    (a static bucket >= every position + 1), so short sequences do not pay for max_seq_len.

    `in_place` (static) promises B == cache slots and row i == slot i: every slot decodes in
    place (idle slots as padding, with position max_seq_len) and attention reads the cache
    directly, with no gather of each row's keys and values.
    Returns float32 logits (B, vocab) and the new cache. `head_t`: see `CausalLM.logits`.
    """
    mask = (jnp.arange(kv_len)[None, :] <= positions[:, None])[:, None, :]  # (B, 1, kv_len)
    new_cache = list(cache)

    def attend(i: int, q: Array, k: Array, v: Array) -> Array:
        kc, vc = new_cache[i]
        # (slot, :, position) takes a (B, KVH, D) block: advanced indices first, as in numpy.
        kc = kc.at[slot_ids, :, positions].set(k[:, 0].astype(kc.dtype), mode="drop")
        vc = vc.at[slot_ids, :, positions].set(v[:, 0].astype(vc.dtype), mode="drop")
        new_cache[i] = (kc, vc)
        if in_place:
            k_rows, v_rows = kc[:, :, :kv_len], vc[:, :, :kv_len]
        else:
            k_rows = kc.at[slot_ids, :, :kv_len].get(mode="clip")  # (B, KVH, kv_len, D); padding rows: any slot
            v_rows = vc.at[slot_ids, :, :kv_len].get(mode="clip")
        return decode_attention(q, k_rows, v_rows, mask)

    h = model.hidden(tokens[:, None], positions[:, None], attend, route)
    return model.logits(h[:, 0], head_t), tuple(new_cache)
