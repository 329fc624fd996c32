"""The name table between Tunix's Flax NNX Qwen3 (`tunix.models.qwen3.model.Qwen3`) and the engine.

    embedder.input_embedding               <-> embed_tokens                         (same layout)
    layers.{i}.attn.q_proj.w   (D, N, H)   <-> layers.{i}.self_attn.q_proj.kernel   (D, N*H)
    layers.{i}.attn.k_proj.w   (D, K, H)   <-> layers.{i}.self_attn.k_proj.kernel   (D, K*H)
    layers.{i}.attn.v_proj.w   (D, K, H)   <-> layers.{i}.self_attn.v_proj.kernel   (D, K*H)
    layers.{i}.attn.o_proj.w   (N, H, D)   <-> layers.{i}.self_attn.o_proj.kernel   (N*H, D)
    layers.{i}.attn.{q,k}_norm.w           <-> layers.{i}.self_attn.{q,k}_norm.weight
    layers.{i}.{input,post_attention}_layernorm.w <-> layers.{i}.{...}_layernorm.weight
    layers.{i}.mlp.{gate,up,down}_proj.kernel     <-> the same path                 (same layout)
    final_norm.w                           <-> norm.weight
    lm_head.w                  (D, V)      <-> lm_head.kernel                       (same layout)

Only reshapes (row-major views on the host), no transposes. Everything else Tunix's tree may hold
(MoE experts and router) maps to nothing and is refused. qwix LoRA leaves (`<w>_lora_a`,
`<w>_lora_b`) are synced as an adapter instead (rollout.integrations.tunix_lora).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from rollout.models.config import ModelConfig
from rollout.weights.spec import ParamSpec, SpecMismatchError

_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), target)
    for pattern, target in (
        (r"embedder\.input_embedding", "embed_tokens"),
        (r"layers\.(\d+)\.attn\.([qkvo])_proj\.w", r"layers.\1.self_attn.\2_proj.kernel"),
        (r"layers\.(\d+)\.attn\.([qk])_norm\.w", r"layers.\1.self_attn.\2_norm.weight"),
        (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.w", r"layers.\1.\2.weight"),
        (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.kernel", r"layers.\1.mlp.\2_proj.kernel"),
        (r"final_norm\.w", "norm.weight"),
        (r"lm_head\.w", "lm_head.kernel"),
    )
)


def tunix_to_path(name: str) -> str | None:
    """Tunix Qwen3 parameter name (dotted) -> engine path, or None if it maps to nothing.

    >>> tunix_to_path("layers.3.attn.q_proj.w"), tunix_to_path("layers.0.attn.q_proj.w_lora_a")
    ('layers.3.self_attn.q_proj.kernel', None)
    """
    for pattern, target in _RULES:
        if pattern.fullmatch(name):
            return pattern.sub(target, name)
    return None


def path_to_tunix(path: str) -> str:
    """Engine path -> the Tunix Qwen3 name it comes from (for error messages)."""
    out = path.replace(".self_attn.", ".attn.")
    if out == "embed_tokens":
        return "embedder.input_embedding"
    if out == "norm.weight":
        return "final_norm.w"
    if out == "lm_head.kernel":
        return "lm_head.w"
    if ".attn." in out and out.endswith("_proj.kernel"):
        return out[: -len(".kernel")] + ".w"
    return out[: -len(".weight")] + ".w" if out.endswith(".weight") else out


def tunix_shape(path: str, shape: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    """The shape Tunix keeps the leaf of engine `path` (engine `shape`) in."""
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    if path.endswith("self_attn.q_proj.kernel"):
        return (shape[0], heads, head_dim)
    if path.endswith(("self_attn.k_proj.kernel", "self_attn.v_proj.kernel")):
        return (shape[0], kv_heads, head_dim)
    if path.endswith("self_attn.o_proj.kernel"):
        return (heads, head_dim, shape[1])
    return shape


def flatten_tunix(params: Any) -> dict[str, Any]:
    """An nnx.State, an nnx.Module or a nested dict of Tunix's model -> {dotted name: array}."""
    if hasattr(params, "to_pure_dict"):  # nnx.State
        params = params.to_pure_dict()
    elif not isinstance(params, Mapping):
        from flax import nnx

        if isinstance(params, nnx.Module):
            params = nnx.state(params, nnx.Param).to_pure_dict()
        else:
            raise TypeError(
                f"expected the parameters of Tunix's Qwen3 (an nnx.State, the nnx.Module or a nested dict), "
                f"got {type(params).__name__}"
            )
    flat: dict[str, Any] = {}

    def walk(node: Mapping[Any, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, name + ".")
            else:
                flat[name] = value.get_value() if hasattr(value, "get_value") and not hasattr(value, "shape") else value

    walk(params, "")
    return flat


def tunix_to_engine(params: Any, spec: ParamSpec, config: ModelConfig) -> dict[str, np.ndarray]:
    """Tunix Qwen3 parameters -> {engine path: host array in engine layout}, with the strict
    checks of a sync: any leaf that maps to nothing, any engine leaf left missing, any shape other
    than Tunix's own for that leaf raises SpecMismatchError (naming Tunix's names), before any
    value is fetched. Dtypes are left to the sync (floats are cast, anything else is refused)."""
    flat = flatten_tunix(params)
    want = spec.by_path()
    mapped: dict[str, tuple[str, Any]] = {}
    unmapped, problems = [], []
    for name, value in flat.items():
        path = tunix_to_path(name)
        if path is None or path not in want:
            unmapped.append(name)
            continue
        expected = tunix_shape(path, want[path].shape, config)
        got = tuple(int(d) for d in np.shape(value))
        if got != expected:
            problems.append(f"{name}: expected shape {expected} (for {path} {want[path].shape}), got {got}")
        mapped[path] = (name, value)
    missing = [f"{path_to_tunix(p)} (-> {p})" for p in spec.paths if p not in mapped]
    if unmapped:
        problems.insert(0, f"{len(unmapped)} Tunix leaf/leaves map to no engine parameter: {_short(unmapped)}")
    if missing:
        problems.insert(0, f"missing {len(missing)} leaf/leaves: {_short(missing)}")
    if problems:
        raise SpecMismatchError(
            "the Tunix parameters do not match the fleet's model (expected the dense Qwen3 of the "
            "served checkpoint: same config, LoRA merged, no MoE):\n  " + "\n  ".join(problems)
        )
    out = {}
    for path in spec.paths:
        _, value = mapped[path]
        out[path] = np.asarray(value).reshape(want[path].shape)  # a view for host-contiguous leaves
    return out


def _short(items: list[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
