"""The name table between HF tensor names and the engine's parameter paths.

    model.embed_tokens.weight                 <-> embed_tokens                       (same layout)
    model.layers.{i}.self_attn.q_proj.weight  <-> layers.{i}.self_attn.q_proj.kernel (transposed)
    model.layers.{i}.self_attn.q_proj.bias    <-> layers.{i}.self_attn.q_proj.bias
    model.layers.{i}.input_layernorm.weight   <-> layers.{i}.input_layernorm.weight
    model.norm.weight                         <-> norm.weight
    lm_head.weight                            <-> lm_head.kernel                     (transposed)

HF linear weights are (out, in); ours are (in, out). Everything else keeps its layout.
"""

from __future__ import annotations

import re

import numpy as np

_LINEAR = re.compile(r"^(?:model\.)?(layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.weight$")
_BIAS = re.compile(r"^(?:model\.)?(layers\.\d+\.self_attn\.[qkv]_proj)\.bias$")
_NORM = re.compile(r"^(?:model\.)?((?:layers\.\d+\.)?(?:self_attn\.)?\w*norm)\.weight$")


def hf_to_path(hf_name: str) -> tuple[str, bool] | None:
    """HF tensor name -> (engine path, transpose?), or None if the name is not a parameter."""
    if hf_name in ("model.embed_tokens.weight", "embed_tokens.weight"):
        return "embed_tokens", False
    if hf_name == "lm_head.weight":
        return "lm_head.kernel", True
    if m := _LINEAR.match(hf_name):
        return f"{m.group(1)}.kernel", True
    if m := _BIAS.match(hf_name):
        return f"{m.group(1)}.bias", False
    if m := _NORM.match(hf_name):
        return f"{m.group(1)}.weight", False
    return None


def path_to_hf(path: str) -> tuple[str, bool]:
    """Engine path -> (HF tensor name, transpose?). The inverse of `hf_to_path`."""
    if path == "embed_tokens":
        return "model.embed_tokens.weight", False
    if path == "lm_head.kernel":
        return "lm_head.weight", True
    if path.endswith(".kernel"):
        return f"model.{path[: -len('.kernel')]}.weight", True
    return f"model.{path}", False


def to_engine_layout(array: np.ndarray, transpose: bool) -> np.ndarray:
    return array.T if transpose else array


# Tensors a checkpoint may carry that are not parameters (derived buffers).
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")
