"""The Qwen3-MoE decoder family (Qwen3MoeForCausalLM) in Flax NNX.

Qwen3's attention (q/k RMSNorm, no biases) with, in the layers `cfg.moe_layers` lists, a sparse
MoE block in place of the MLP: a router (`mlp.gate`) and `num_experts` SwiGLU experts stored
as stacked leaves `[experts, ...]` on the logical axis "expert" (see rollout.models.sharding for
how experts are split over devices). The other layers (mlp_only_layers, decoder_sparse_step)
keep Qwen3's dense MLP. Routing and dispatch: rollout.models.moe.

`hidden(tokens, positions, attend, route)` takes, beside the attention hook every family has,
a routing hook: `route(moe_layer_index, probs)` returns the experts each token uses (the
router's top k by default), so the forwards can record routes or replay given ones.

HF names: per-expert tensors (`mlp.experts.{e}.gate_proj.weight`, what save_pretrained writes)
and transformers 5's fused in-memory ones (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`)
both map onto the stacked leaves (`StackRule`, `SplitRule` in rollout.weights.hf_names).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rollout.models import qwen
from rollout.models.config import ModelConfig
from rollout.models.expert_parallel import sparse_moe_mlp
from rollout.models.forward import AttendFn
from rollout.models.layers import Linear, RMSNorm
from rollout.models.moe import RouteFn, routing_weights, top_k_experts
from rollout.weights.hf_names import TRANSPOSE, HFNames, NameRule, SplitRule, StackRule

Array = jax.Array


class Experts(nnx.Module):
    """`num_experts` SwiGLU MLPs, each projection one stacked leaf."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = jax.nn.initializers.normal(0.02)
        self.gate_proj = nnx.Param(init(rngs.params(), (e, h, i), dtype), axes=("expert", "embed", "moe_mlp"))  # (E, hidden, inter)
        self.up_proj = nnx.Param(init(rngs.params(), (e, h, i), dtype), axes=("expert", "embed", "moe_mlp"))  # (E, hidden, inter)
        self.down_proj = nnx.Param(init(rngs.params(), (e, i, h), dtype), axes=("expert", "moe_mlp", "embed"))  # (E, inter, hidden)


class SparseMoeBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, ("embed", "router"), bias=False, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg, dtype, rngs)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob

    def __call__(self, x: Array, pick: RouteFn, moe_index: int) -> Array:
        """x (B, T, hidden) -> (B, T, hidden); `pick(moe_index, probs)` chooses the experts."""
        b, t, h = x.shape
        probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)  # (B, T, E)
        ids = pick(moe_index, probs)  # (B, T, k)
        weights = routing_weights(probs, ids, self.norm_topk_prob).astype(x.dtype)
        e = self.experts
        out = sparse_moe_mlp(
            x.reshape(b * t, h), ids.reshape(b * t, -1), weights.reshape(b * t, -1),
            e.gate_proj[...], e.up_proj[...], e.down_proj[...],
        )
        return out.reshape(b, t, h)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, index: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = qwen.Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = SparseMoeBlock(cfg, dtype, rngs) if index in cfg.moe_layers else qwen.MLP(cfg, dtype, rngs)


class QwenMoeForCausalLM(qwen.OutputHead, nnx.Module):
    """Qwen3-MoE decoder. Parameter paths mirror HF names (see HF_NAMES); `logits` is Qwen's."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Param(
            jax.nn.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype),
            axes=("vocab", "embed"),
        )  # (vocab, hidden)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype, rngs=rngs)
        )

    def hidden(self, tokens: Array, positions: Array, attend: AttendFn, route: RouteFn | None = None) -> Array:
        """tokens, positions (B, T) -> final hidden states (B, T, hidden). `route`: see the
        module docstring (None: the router's top k)."""
        k = self.config.num_experts_per_tok
        pick = route if route is not None else (lambda _i, probs: top_k_experts(probs, k))
        x = self.embed_tokens[...][tokens]
        moe_index = 0
        for i, layer in enumerate(self.layers):
            b, t, _ = x.shape
            q, kk, v = layer.self_attn.qkv(layer.input_layernorm(x), positions)
            o = attend(i, q, kk, v).reshape(b, t, -1)
            x = x + layer.self_attn.o_proj(o)
            h = layer.post_attention_layernorm(x)
            if isinstance(layer.mlp, SparseMoeBlock):
                x = x + layer.mlp(h, pick, moe_index)
                moe_index += 1
            else:
                x = x + layer.mlp(h)
        return self.norm(x)


MODEL = QwenMoeForCausalLM  # what the registry builds

_EXPERTS = "model.layers.{layer}.mlp.experts"
HF_NAMES = HFNames(
    rules=(
        *qwen.HF_NAMES.rules,
        NameRule("model.layers.{layer}.mlp.gate.weight", "layers.{layer}.mlp.gate.kernel", TRANSPOSE),
        # canonical stacked tensors in HF layout (experts, out, in): transposed per expert
        *(NameRule(f"{_EXPERTS}.{p}", f"layers.{{layer}}.mlp.experts.{p}", TRANSPOSE)
          for p in ("gate_proj", "up_proj", "down_proj")),
    ),
    tied_head=qwen.HF_NAMES.tied_head,
    tied_to=qwen.HF_NAMES.tied_to,
    stacks=tuple(
        StackRule(f"{_EXPERTS}.{{expert}}.{p}.weight", f"{_EXPERTS}.{p}") for p in ("gate_proj", "up_proj", "down_proj")
    ),
    # transformers 5 in memory: gate_up_proj (experts, 2 * inter, hidden), gate rows first
    splits=(SplitRule(f"{_EXPERTS}.gate_up_proj", (f"{_EXPERTS}.gate_proj", f"{_EXPERTS}.up_proj"), axis=1),),
)
