"""Registry of model families keyed by the HF `architectures` name."""

from __future__ import annotations

import dataclasses

from rollout.models.config import UnsupportedConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    """What distinguishes one member of the Qwen decoder family from another."""

    name: str
    qk_norm: bool  # RMSNorm over each q/k head before RoPE
    qkv_bias: bool  # bias on the q/k/v projections


_FAMILIES: dict[str, Family] = {
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True, qkv_bias=False),
    "Qwen2ForCausalLM": Family("qwen2", qk_norm=False, qkv_bias=True),
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
