"""Registry of model families keyed by the HF `architectures` name: one line per architecture.

A family is one module (its NNX modules with the logical axes of every parameter, `MODEL`, and
its HF name table, `HF_NAMES`; see rollout/models/qwen.py) plus a line here saying which
architecture it serves and with which config flags. This file imports no jax: the driver reads
configs with it, and the family's module is imported only when a model is built.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from rollout.errors import UnsupportedConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    """An architecture's family module and the config flags it sets."""

    name: str
    module: str  # defines MODEL (the NNX model class) and HF_NAMES (rollout.weights.hf_names.HFNames)
    qk_norm: bool  # RMSNorm over each q/k head before RoPE
    qkv_bias: bool  # bias on the q/k/v projections
    moe: bool = False  # reads the mixture-of-experts fields of config.json (num_experts, ...)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


_FAMILIES: dict[str, Family] = {
    "Qwen3ForCausalLM": Family("qwen3", "rollout.models.qwen", qk_norm=True, qkv_bias=False),
    "Qwen2ForCausalLM": Family("qwen2", "rollout.models.qwen", qk_norm=False, qkv_bias=True),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", "rollout.models.qwen_moe", qk_norm=True, qkv_bias=False, moe=True),
}


def family_for(architecture: str) -> Family:
    try:
        return _FAMILIES[architecture]
    except KeyError:
        raise UnsupportedConfigError(
            f"architecture {architecture!r} is not supported; supported: {sorted(_FAMILIES)}"
        ) from None


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)
