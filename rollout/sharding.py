"""Tensor-parallel sharding of params and KV cache over one worker's devices.

Each array dimension carries a logical axis name; one small table maps logical names to the mesh
axis `tp`. A logical axis is sharded only when its size divides evenly by the number of devices
(e.g. 2 KV heads on 4 devices stay replicated), so any device count works.

    q/k/v/gate/up kernels: column-parallel    (embed, heads|mlp)
    o/down kernels:        row-parallel       (heads|mlp, embed)
    embedding and lm head: vocab-parallel
    KV cache:              by KV heads        (slots, kv_heads, seq, head_dim)
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rollout.models.config import ModelConfig

TP = "tp"

# Logical axes of each parameter, keyed by the last two components of its path.
_PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("q_proj", "kernel"): ("embed", "q_heads"),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("o_proj", "kernel"): ("q_heads", "embed"),
    ("q_proj", "bias"): ("q_heads",),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "bias"): ("kv_heads",),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
}
CACHE_AXES: tuple[str | None, ...] = (None, "kv_heads", None, None)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), (TP,))


def logical_rules(cfg: ModelConfig, tp: int) -> dict[str, str | None]:
    """Logical axis -> mesh axis, sharding only what divides evenly over `tp` devices."""
    sizes = {
        "vocab": cfg.vocab_size,
        "q_heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "mlp": cfg.intermediate_size,
    }
    rules: dict[str, str | None] = {"embed": None}
    for name, size in sizes.items():
        rules[name] = TP if tp > 1 and size % tp == 0 else None
    return rules


def param_axes(path: str) -> tuple[str | None, ...]:
    parts = path.split(".")
    if parts[-1] == "embed_tokens":
        return ("vocab", "embed")
    return _PARAM_AXES.get(tuple(parts[-2:]), ())  # norms and anything else: replicated


def to_spec(axes: tuple[str | None, ...], rules: dict[str, str | None]) -> PartitionSpec:
    """Logical axes -> PartitionSpec, in canonical form (no trailing None).

    jit returns shardings in canonical form; an input spec with trailing Nones would compare
    unequal to it and make the next call with the returned cache compile again.

    >>> to_spec((None, None, "kv_heads", None), {"kv_heads": "tp"})
    PartitionSpec(None, None, 'tp')
    """
    parts = [rules.get(a) if a else None for a in axes]
    while parts and parts[-1] is None:
        parts.pop()
    return PartitionSpec(*parts)


def param_sharding(path: str, mesh: Mesh, cfg: ModelConfig) -> NamedSharding:
    return NamedSharding(mesh, to_spec(param_axes(path), logical_rules(cfg, mesh.size)))


def cache_sharding(mesh: Mesh, cfg: ModelConfig) -> NamedSharding:
    return NamedSharding(mesh, to_spec(CACHE_AXES, logical_rules(cfg, mesh.size)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
