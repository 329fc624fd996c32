"""The Qwen decoder family (Qwen3 dense, Qwen2/2.5) in Flax NNX.

One module tree serves both families: Qwen3 normalizes each q/k head before RoPE (`qk_norm`),
Qwen2 adds biases to the q/k/v projections (`qkv_bias`). Three forwards share the parameters:

- `forward_full`: all-position logits of a padded batch (scoring, training, logprob checks);
- `prefill`: a batch of right-padded prompts, writing their K/V into cache slots;
- `decode`: one token for each of a batch of cache slots, attending over each slot's cached K/V.

The KV cache lives outside the model (see `init_cache`), so the engine owns its lifetime and the
jitted functions can take parameters and cache as plain arguments. Norms, RoPE and the attention
softmax run in float32 whatever the parameter dtype.

This module is the whole family: the NNX modules, where every parameter is declared once with
its shape, dtype, initializer and logical axes (`axes=`, from which `rollout.sharding` derives its
sharding), and `HF_NAMES`, the table between HF tensor names and the parameter paths. The
registry (rollout.models.registry) names this module for Qwen3ForCausalLM and Qwen2ForCausalLM.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rollout.models.config import ModelConfig
from rollout.weights.hf_names import TRANSPOSE, HFNames, NameRule

Array = jax.Array
# (k, v) per layer, each (slots, kv_heads, max_seq_len, head_dim): head-major, so attention over
# the cache reads each head's keys contiguously with no transpose
KVCache = tuple[tuple[Array, Array], ...]
_MASKED = -1e30


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, axis: str = "embed"):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=(axis,))  # (dim,)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); `axes` are the logical axes of (in, out)."""

    def __init__(
        self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype), axes=axes)  # (in, out)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype), axes=axes[1:]) if bias else None  # (out,)

    def __call__(self, x: Array) -> Array:
        y = x @ self.kernel[...]
        return y + self.bias[...] if self.bias is not None else y


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        # column-parallel q/k/v (split by heads), row-parallel o
        self.q_proj = Linear(h, cfg.num_heads * d, ("embed", "q_heads"), bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * d, h, ("q_heads", "embed"), bias=False, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, "head_dim") if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, "head_dim") if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.rope_theta = cfg.rope_theta

    def qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """x (B, T, hidden), positions (B, T) -> q (B, T, H, D), k and v (B, T, KVH, D)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, ("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(h, i, ("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(i, h, ("mlp", "embed"), bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)


# attend(layer_index, q, k, v) -> attention output (B, T, H, D); it may record K/V into a cache.
AttendFn = Callable[[int, Array, Array, Array], Array]


class QwenForCausalLM(nnx.Module):
    """Qwen3 / Qwen2 decoder. Parameter paths mirror HF names (see HF_NAMES)."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Param(
            jax.nn.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype),
            axes=("vocab", "embed"),
        )  # (vocab, hidden)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype, rngs=rngs)
        )

    def hidden(self, tokens: Array, positions: Array, attend: AttendFn) -> Array:
        """tokens, positions (B, T) -> final hidden states (B, T, hidden)."""
        x = self.embed_tokens[...][tokens]
        for i, layer in enumerate(self.layers):
            b, t, _ = x.shape
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), positions)
            o = attend(i, q, k, v).reshape(b, t, -1)
            x = x + layer.self_attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def logits(self, h: Array, head_t: Array | None = None) -> Array:
        """h (..., hidden) -> float32 logits (..., vocab).

        `head_t` (hidden, vocab), if given, is a transposed copy of the tied embedding to use as
        the output projection: on CPU, XLA's dot is much faster against a (hidden, vocab) matrix
        than against the transpose of a (vocab, hidden) one at decode batch sizes.
        """
        if head_t is not None:
            out = h @ head_t
        elif self.lm_head is None:
            out = h @ self.embed_tokens[...].T
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)


MODEL = QwenForCausalLM  # what the registry builds

_LAYER_TENSORS = (  # (HF name and engine path after "...layers.{layer}.", transposed?)
    ("self_attn.q_proj", True), ("self_attn.k_proj", True), ("self_attn.v_proj", True), ("self_attn.o_proj", True),
    ("mlp.gate_proj", True), ("mlp.up_proj", True), ("mlp.down_proj", True),
    ("input_layernorm", False), ("post_attention_layernorm", False),
    ("self_attn.q_norm", False), ("self_attn.k_norm", False),
)
# HF linear weights are (out, in), our kernels (in, out): transposed. Everything else keeps its
# layout. Qwen2's q/k/v biases keep their names. A tied model has no lm_head: its embedding is
# the output projection.
HF_NAMES = HFNames(
    rules=(
        NameRule("model.embed_tokens.weight", "embed_tokens"),
        NameRule("model.norm.weight", "norm.weight"),
        NameRule("lm_head.weight", "lm_head.kernel", TRANSPOSE),
        *(
            NameRule(f"model.layers.{{layer}}.{name}.weight", f"layers.{{layer}}.{name}.{'kernel' if t else 'weight'}",
                     TRANSPOSE if t else "none")
            for name, t in _LAYER_TENSORS
        ),
        *(NameRule(f"model.layers.{{layer}}.self_attn.{p}_proj.bias", f"layers.{{layer}}.self_attn.{p}_proj.bias")
          for p in "qkv"),
    ),
    tied_head="lm_head.weight",
    tied_to="model.embed_tokens.weight",
)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, half-split layout (as HF Qwen). x (B, T, N, D), positions (B, T)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # (D/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, D/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention.

    q (B, T, H, D); k, v (B, KVH, S, D) head-major, as the KV cache holds them; mask (B, T, S)
    True where a query may attend. Returns (B, T, H, D). Softmax in float32.
    """
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


def forward_full(model: QwenForCausalLM, tokens: Array, attention_mask: Array) -> Array:
    """tokens, attention_mask (B, T) -> float32 logits (B, T, vocab) at every position."""
    mask = causal_padding_mask(attention_mask)
    positions = positions_from_mask(attention_mask)
    h = model.hidden(tokens, positions, lambda i, q, k, v: attention(q, head_major(k), head_major(v), mask))
    return model.logits(h)


def init_cache(cfg: ModelConfig, slots: int, max_seq_len: int, dtype: jnp.dtype) -> KVCache:
    shape = cache_shape(cfg, slots, max_seq_len)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def cache_shape(cfg: ModelConfig, slots: int, max_seq_len: int) -> tuple[int, int, int, int]:
    return (slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)


def prefill(
    model: QwenForCausalLM,
    cache: KVCache,
    tokens: Array,
    lengths: Array,
    dst_slots: Array,
    src_rows: Array,
    head_t: Array | None = None,
) -> tuple[Array, KVCache]:
    """Run right-padded prompts and write their K/V into cache slots.

    tokens (B, P) right-padded; lengths (B,) real lengths (0 for padding rows).
    dst_slots, src_rows (M,): cache slot dst_slots[m] receives the K/V of prompt src_rows[m], so
    the n samples of one prompt share one prefill. Out-of-range dst_slots are dropped (padding).
    Returns the float32 logits at each prompt's last real token (B, vocab) and the new cache.
    `head_t`: see `QwenForCausalLM.logits`.
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

    h = model.hidden(tokens, positions, attend)
    last = h[jnp.arange(b), jnp.maximum(lengths - 1, 0)]  # (B, hidden)
    return model.logits(last, head_t), tuple(new_cache)


def decode(
    model: QwenForCausalLM,
    cache: KVCache,
    slot_ids: Array,
    tokens: Array,
    positions: Array,
    kv_len: int,
    head_t: Array | None = None,
    in_place: bool = False,
) -> tuple[Array, KVCache]:
    """One step for a batch of cache slots.

    slot_ids, tokens, positions (B,): which cache slot each row decodes, the token it feeds and
    that token's position. Rows whose slot id or position is out of range are padding: their
    writes are dropped and their outputs are meaningless. Attention covers cache[slot, :, :kv_len]
    (a static bucket >= every position + 1), so short sequences do not pay for max_seq_len.

    `in_place` (static) promises B == cache slots and row i == slot i: every slot decodes in
    place (idle slots as padding, with position max_seq_len) and attention reads the cache
    directly, with no gather of each row's keys and values.
    Returns float32 logits (B, vocab) and the new cache. `head_t`: see `QwenForCausalLM.logits`.
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

    h = model.hidden(tokens[:, None], positions[:, None], attend)
    return model.logits(h[:, 0], head_t), tuple(new_cache)
