"""The Qwen decoder family (Qwen3 dense, Qwen2/2.5) in Flax NNX.

One module tree serves both: Qwen3 normalizes each q/k head before RoPE (`qk_norm`), Qwen2 adds
biases to the q/k/v projections (`qkv_bias`). The forwards (full sequence, prefill, decode) and
the KV cache are shared by every family: rollout.models.forward.

This module is the whole family: the NNX modules, where every parameter is declared once with
its shape, dtype, initializer and logical axes (`axes=`, from which `rollout.models.sharding` derives its
sharding), and `HF_NAMES`, the table between HF tensor names and the parameter paths. The
registry (rollout.models.registry) names this module for Qwen3ForCausalLM and Qwen2ForCausalLM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rollout.models import invariant
from rollout.models.config import ModelConfig
from rollout.models.forward import AttendFn
from rollout.models.layers import Linear, RMSNorm, matmul, rope
from rollout.models.moe import RouteFn
from rollout.weights.hf_names import TRANSPOSE, HFNames, NameRule

Array = jax.Array


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
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (cfg.qk_norm)
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


class OutputHead:
    """`logits` of a Qwen-family model: the tied embedding or the untied lm_head."""

    embed_tokens: nnx.Param
    lm_head: Linear | None

    def logits(self, h: Array, head_t: Array | None = None) -> Array:
        """h (..., hidden) -> float32 logits (..., vocab).

        `head_t` (hidden, vocab), if given, is a transposed copy of the tied embedding to use as
        the output projection: on CPU, XLA's dot is much faster against a (hidden, vocab) matrix
        than against the transpose of a (vocab, hidden) one at decode batch sizes.
        """
        if head_t is not None and not invariant.active():  # the mode runs what a trainer can
            out = matmul(h, head_t)  # the engine may quantize this copy (rollout.engine.quantized)
        elif self.lm_head is None:
            out = matmul(h, self.embed_tokens[...].T)
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)


class QwenForCausalLM(OutputHead, nnx.Module):
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

    def hidden(
        self, tokens: Array, positions: Array, attend: AttendFn, route: RouteFn | None = None,
        states: list[Array] | None = None,
    ) -> Array:
        """tokens, positions (B, T) -> final hidden states (B, T, hidden). `route` is unused: a
        dense model routes nothing. `states`, if given, receives each layer's input (the
        residual stream; the first is the embeddings)."""
        x = self.embed_tokens[...][tokens]
        for i, layer in enumerate(self.layers):
            if states is not None:
                states.append(x)
            b, t, _ = x.shape
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), positions)
            o = attend(i, q, k, v).reshape(b, t, -1)
            x = x + layer.self_attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)


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
