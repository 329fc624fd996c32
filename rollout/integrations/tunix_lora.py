"""Tunix's LoRA (qwix) parameters as a rollout LoRA adapter, so a Tunix learner that trains LoRA
syncs only the adapter.

qwix's LoraProvider adds two parameters beside each targeted weight `<w>` of Tunix's Qwen3:
`<w>_lora_a` with the weight's contracting dims then the rank, and `<w>_lora_b` with the rank
then the weight's remaining dims, and applies `x @ lora_a @ lora_b * alpha / rank`:

    layers.{i}.attn.q_proj.w_lora_a        (D, r)       layers.{i}.attn.q_proj.w_lora_b   (r, N*H) or (r, N, H)
    layers.{i}.attn.o_proj.w_lora_a        (N*H, r) or (N, H, r)             ..._lora_b   (r, D)
    layers.{i}.mlp.up_proj.kernel_lora_a   (D, F)... i.e. (in, r)           ..._lora_b   (r, out)

Tunix's weights map onto the engine's kernels (in, out) by row-major reshapes only
(rollout.integrations.tunix_names), so lora_a reshaped to (in, r) is PEFT's A transposed and
lora_b reshaped to (r, out) is PEFT's B transposed; the scale is qwix's alpha / rank (no rsLoRA).
The result is a `rollout.LoraAdapter` in PEFT names, checked like any adapter when it is synced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rollout.integrations.tunix_names import flatten_tunix, tunix_to_path
from rollout.weights.lora import LoraAdapter, LoraAdapterError, LoraConfig
from rollout.weights.spec import ParamSpec

SUFFIXES = ("_lora_a", "_lora_b")


def lora_leaves(params: Any) -> dict[str, Any]:
    """The qwix LoRA leaves of a Tunix parameter tree (nnx.State, module or nested dict), by
    dotted name: `<weight>_lora_a` / `_lora_b` of a weight Tunix's Qwen3 has; empty when the tree
    has none (anything else is left to the full sync's checks)."""
    return {
        name: value for name, value in flatten_tunix(params).items()
        if name.endswith(SUFFIXES) and tunix_to_path(name[: -len("_lora_a")]) is not None
    }


def qwix_lora_adapter(leaves: Mapping[str, Any], spec: ParamSpec, alpha: float) -> LoraAdapter:
    """qwix LoRA leaves (module docstring) -> a LoraAdapter in PEFT names with rank and `alpha`
    (qwix's LoraProvider alpha). Raises LoraAdapterError for a leaf whose weight maps to no
    linear kernel of the fleet's model, a lone factor, or shapes that do not fit the kernel."""
    if spec.hf is None:
        raise LoraAdapterError("the model spec has no HF name table to name the adapter's modules with")
    want = spec.by_path()
    pairs: dict[str, dict[str, Any]] = {}
    for name, value in leaves.items():
        weight, factor = name[: -len("_lora_a")], name[-1]
        path = tunix_to_path(weight)
        if path is None or path not in want or not path.endswith(".kernel"):
            raise LoraAdapterError(f"{name}: {weight!r} is not a linear weight of the fleet's model")
        pairs.setdefault(path, {})[factor] = value
    if not pairs:
        raise LoraAdapterError("no qwix LoRA leaves (<weight>_lora_a / <weight>_lora_b) in the tree")
    ranks = set()
    tensors: dict[str, np.ndarray] = {}
    for path, both in pairs.items():
        if set(both) != {"a", "b"}:
            raise LoraAdapterError(f"{path}: qwix LoRA needs both _lora_a and _lora_b, got only _lora_{next(iter(both))}")
        a, b = np.asarray(both["a"]), np.asarray(both["b"])
        d_in, d_out = want[path].shape
        rank = a.shape[-1] if a.ndim else 0
        if a.size != d_in * rank or b.size != d_out * rank or (b.ndim and b.shape[0] != rank):
            raise LoraAdapterError(
                f"{path}: qwix lora_a {a.shape} / lora_b {b.shape} do not fit the kernel (in={d_in}, out={d_out}): "
                "expected lora_a (contracting dims..., r) and lora_b (r, remaining dims...)"
            )
        ranks.add(rank)
        module = spec.hf.to_hf(path)[0].removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.reshape(d_in, rank).T
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.reshape(rank, d_out).T
    if len(ranks) != 1:
        raise LoraAdapterError(f"qwix LoRA leaves of several ranks {sorted(ranks)}: one rank per adapter is supported")
    return LoraAdapter(tensors, LoraConfig(rank=ranks.pop(), alpha=float(alpha)))
