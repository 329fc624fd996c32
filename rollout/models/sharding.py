"""Tensor-parallel sharding of params and KV cache over one worker's devices.

Every parameter declares its logical axes where it is made (`nnx.Param(..., axes=("embed",
"q_heads"))` in the family's module); one small table maps logical names to the mesh axis `tp`.
A logical axis is split only when its size divides evenly by the number of devices (e.g. 2 KV
heads on 4 devices stay replicated), so any device count works. A parameter without declared
axes, or with an axis this table has no rule for, is refused when the model is built
(ShardingRuleError): nothing is replicated by accident.

    q/k/v/gate/up kernels: column-parallel    (embed, q_heads|kv_heads|mlp)
    o/down kernels:        row-parallel       (q_heads|mlp, embed)
    embedding and lm head: vocab-parallel
    norms:                 replicated         (embed) or (head_dim)
    KV cache:              by KV heads        (slots, kv_heads, seq, head_dim)
    MoE router:            replicated         (embed, router)
    MoE experts (stacked): expert-parallel    (expert, embed, moe_mlp) / (expert, moe_mlp, embed)

Mixture of experts: expert parallelism when the expert count divides by the device count (each
device holds num_experts / tp whole experts); otherwise tensor parallelism inside every expert
(each device holds a 1/tp slice of every expert's intermediate dimension) when
moe_intermediate_size divides; otherwise the experts are replicated. Never both: an expert is
split one way only. Expert parallelism splits the compute as well as the memory: the MoE MLP
runs under shard_map (rollout.models.expert_parallel), each device multiplying only the
(token, expert) rows routed to its own experts, and one all-reduce per MoE layer sums the
devices' partial outputs; tokens, router and routes are replicated. Inside-expert tensor
parallelism is left to XLA's partitioner (column-parallel gate/up, row-parallel down).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rollout.models.config import ModelConfig

TP = "tp"

REPLICATED_AXES = ("embed", "head_dim", "router")  # never split: every device needs them whole
# split over `tp` when their size divides ("moe_mlp" only when "expert" is not split)
SPLIT_AXES = ("vocab", "q_heads", "kv_heads", "mlp", "expert", "moe_mlp")
LOGICAL_AXES = REPLICATED_AXES + SPLIT_AXES
CACHE_AXES: tuple[str | None, ...] = (None, "kv_heads", None, None)

Axes = tuple[str | None, ...]


class ShardingRuleError(ValueError):
    """A parameter whose logical axes have no sharding rule."""


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), (TP,))


def logical_rules(cfg: ModelConfig, tp: int) -> dict[str, str | None]:
    """Logical axis -> mesh axis, splitting only what divides evenly over `tp` devices."""
    sizes = {
        "vocab": cfg.vocab_size,
        "q_heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "mlp": cfg.intermediate_size,
        "expert": cfg.num_experts,
        "moe_mlp": cfg.moe_intermediate_size,
    }
    rules: dict[str, str | None] = dict.fromkeys(REPLICATED_AXES)
    for name in SPLIT_AXES:
        rules[name] = TP if tp > 1 and sizes[name] > 0 and sizes[name] % tp == 0 else None
    if rules["expert"] is not None:  # expert parallelism: each expert whole on one device
        rules["moe_mlp"] = None
    return rules


def check_axes(path: str, axes: Axes | None, ndim: int) -> Axes:
    """`axes` if every one has a rule and there is one per dimension, else ShardingRuleError.

    >>> check_axes("mlp.up_proj.kernel", ("embed", "experts"), 2)
    Traceback (most recent call last):
    ...
    rollout.models.sharding.ShardingRuleError: parameter 'mlp.up_proj.kernel' has logical axes ('embed', 'experts'): no sharding rule for ['experts']; use axes of rollout.models.sharding.LOGICAL_AXES ('embed', 'head_dim', 'router', 'vocab', 'q_heads', 'kv_heads', 'mlp', 'expert', 'moe_mlp') or add a rule for them to rollout.models.sharding.logical_rules
    """
    if axes is None:
        raise ShardingRuleError(
            f"parameter {path!r} declares no logical axes; declare them where it is made, e.g. "
            f"nnx.Param(value, axes=('embed', 'mlp')) (one per dimension, from {LOGICAL_AXES})"
        )
    unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES]
    if unknown:
        raise ShardingRuleError(
            f"parameter {path!r} has logical axes {tuple(axes)}: no sharding rule for {unknown}; use axes "
            f"of rollout.models.sharding.LOGICAL_AXES {LOGICAL_AXES} or add a rule for them to "
            "rollout.models.sharding.logical_rules"
        )
    if len(axes) != ndim:
        raise ShardingRuleError(
            f"parameter {path!r} has {ndim} dimension(s) but logical axes {tuple(axes)}; declare one per dimension"
        )
    return tuple(axes)


def to_spec(axes: Axes, rules: Mapping[str, str | None]) -> PartitionSpec:
    """Logical axes -> PartitionSpec, in canonical form (no trailing None).

    jit returns shardings in canonical form; an input spec with trailing Nones would compare
    unequal to it and make the next call with the returned cache compile again.

    >>> to_spec((None, None, "kv_heads", None), {"kv_heads": "tp"})
    P(None, None, 'tp')
    """
    parts = [rules.get(a) if a else None for a in axes]
    while parts and parts[-1] is None:
        parts.pop()
    return PartitionSpec(*parts)


def logical_sharding(axes: Axes, mesh: Mesh, cfg: ModelConfig) -> NamedSharding:
    """The sharding of an array with logical `axes` on `mesh`."""
    return NamedSharding(mesh, to_spec(axes, logical_rules(cfg, mesh.size)))


def cache_sharding(mesh: Mesh, cfg: ModelConfig) -> NamedSharding:
    return logical_sharding(CACHE_AXES, mesh, cfg)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
