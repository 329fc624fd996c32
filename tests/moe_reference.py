"""Tiny random Qwen3-MoE checkpoints written by transformers itself, and its router's choices.

`make_moe_checkpoint` builds a `Qwen3MoeForCausalLM` from a config, draws its weights (scaled
like rollout.testing's tiny models: peaked next-token distributions, and router logits spread
enough that each token's top-k experts are clearly apart), writes it with `save_pretrained`
(per-expert tensor names, optionally sharded) and adds the tiny tokenizer. torch is a test-only
reference; nothing in the product imports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rollout.testing import make_tiny_checkpoint

TINY_MOE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=True,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
)
_RESIDUAL_OUT_GAIN = 12.0  # as rollout.testing: keeps greedy decoding from repeating its input
_ROUTER_GAIN = 4.0  # router logits of std ~4: the top-k probabilities are well apart


def make_moe_checkpoint(path: Path, seed: int = 0, *, max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Write a tiny Qwen3-MoE checkpoint (transformers' save_pretrained) with the tiny tokenizer."""
    import torch
    import transformers

    settings = {**TINY_MOE, **overrides}
    # tokenizer, tokenizer_config and generation_config of the tiny dense model
    make_tiny_checkpoint(path, "Qwen3ForCausalLM", vocab_size=settings["vocab_size"])
    for stale in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    generation = json.loads((path / "generation_config.json").read_text())
    config = transformers.Qwen3MoeConfig(**settings, eos_token_id=generation["eos_token_id"][0])
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_draw(name, tuple(param.shape), gen))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path


def _draw(name: str, shape: tuple[int, ...], gen: Any) -> Any:
    import torch

    x = torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * x
    if "embed_tokens" in name or name == "lm_head.weight":
        return x
    fan_in = shape[-1]
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        return x * (_RESIDUAL_OUT_GAIN / math.sqrt(fan_in))
    if name.endswith("mlp.gate.weight"):
        return x * (_ROUTER_GAIN / math.sqrt(fan_in))
    return x / math.sqrt(fan_in)


def hf_routes(path: Path, tokens: Sequence[int]) -> np.ndarray:
    """transformers' router top-k at every position of `tokens`: (T, MoE layers, k) int, from
    output_router_logits (softmax in float32, torch.topk), most probable first."""
    import torch

    from hf_reference import hf_model

    model = hf_model(str(path))
    with torch.no_grad():
        out = model(torch.tensor([list(tokens)]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    per_layer = [torch.topk(torch.softmax(r.float(), dim=-1), k, dim=-1).indices for r in out.router_logits]
    return torch.stack(per_layer, dim=1).numpy()  # (T, layers, k)
