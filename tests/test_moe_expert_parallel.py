"""Expert parallelism: with the experts split over 4 devices, each device multiplies only the
rows routed to its own experts, and the devices' partial sums are the single-device MoE MLP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rollout.models.expert_parallel import expert_mesh, local_expert_mlp, sparse_moe_mlp
from rollout.models.moe import expert_mlp
from rollout.models.sharding import TP

TOKENS, K, EXPERTS, HIDDEN, INTER = 64, 2, 8, 64, 32


def mesh_of(n: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), (TP,))


def moe_inputs(routes: str, seed: int = 0) -> tuple[np.ndarray, ...]:
    """x, ids, weights, gate, up, down; `routes`: "spread" (random distinct experts per token)
    or "one-device" (every token to experts 0 and 1, both held by the first of 4 devices)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32)
    if routes == "spread":
        ids = np.stack([rng.choice(EXPERTS, K, replace=False) for _ in range(TOKENS)]).astype(np.int32)
    else:
        ids = np.tile(np.arange(K, dtype=np.int32), (TOKENS, 1))
    weights = rng.random((TOKENS, K)).astype(np.float32)
    gate, up = (rng.standard_normal((EXPERTS, HIDDEN, INTER)).astype(np.float32) / 8 for _ in range(2))
    down = rng.standard_normal((EXPERTS, INTER, HIDDEN)).astype(np.float32) / 6
    return x, ids, weights, gate, up, down


def on_mesh(mesh: Mesh, x, ids, weights, gate, up, down) -> tuple[jax.Array, ...]:
    """Tokens and routes replicated, the stacked expert weights split by expert, as the engine
    places them."""
    rep, by_expert = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(TP))
    return (
        *(jax.device_put(a, rep) for a in (x, ids, weights)),
        *(jax.device_put(a, by_expert) for a in (gate, up, down)),
    )


def assert_close(got, want) -> None:
    got, want = np.asarray(got), np.asarray(want)
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err <= 1e-5, f"max|diff| / max|want| = {err:.2e}"


@pytest.mark.parametrize("chunk", [8, 128], ids=["several-chunks", "one-chunk"])
def test_the_devices_local_expert_shares_sum_to_the_moe_mlp(chunk):
    x, ids, weights, gate, up, down = map(jnp.asarray, moe_inputs("spread"))
    per_device = EXPERTS // 4
    shares = [
        local_expert_mlp(x, ids - d * per_device, weights, *(w[d * per_device : (d + 1) * per_device] for w in (gate, up, down)), chunk)
        for d in range(4)
    ]
    assert_close(sum(shares), expert_mlp(x, ids, weights, gate, up, down))


@pytest.mark.parametrize("routes", ["spread", "one-device"])
def test_the_expert_parallel_mlp_on_4_devices_equals_the_single_device_mlp(routes):
    args = moe_inputs(routes)
    want = jax.jit(expert_mlp)(*args)
    got = jax.jit(sparse_moe_mlp)(*on_mesh(mesh_of(4), *args))
    assert_close(got, want)


def compiled_flops_per_device(fn, mesh: Mesh) -> float:
    """XLA's FLOP count of `fn` compiled for `mesh` (per device: an SPMD program is one device's)."""
    cost = jax.jit(fn).lower(*on_mesh(mesh, *moe_inputs("spread"))).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_each_of_4_devices_multiplies_about_a_quarter_of_the_routed_rows():
    # One device: every routed row. Four devices splitting the experts: each multiplies its own
    # experts' rows, a chunk of 1.25 x a quarter of them (the global computation XLA makes of a
    # grouped matmul over split experts repeats all of the work on every device). Counted with
    # the "tiled" grouped matmul, whose work is static; XLA's cost analysis counts the CPU
    # default's loop body once, whatever its trip count.
    mlp = functools.partial(sparse_moe_mlp, impl="tiled")
    one = compiled_flops_per_device(mlp, mesh_of(1))
    four = compiled_flops_per_device(mlp, mesh_of(4))
    assert four < 0.4 * one, f"per-device FLOPs on 4 devices {four:.3g} vs {one:.3g} on one"


def test_experts_are_split_only_over_a_mesh_whose_size_divides_them():
    gate = np.zeros((6, HIDDEN, INTER), np.float32)
    assert expert_mesh(jnp.asarray(gate)) is None  # one device, no mesh to split over
    assert expert_mesh(jax.device_put(gate, NamedSharding(mesh_of(2), PartitionSpec(TP)))) is not None
    assert expert_mesh(jax.device_put(gate, NamedSharding(mesh_of(4), PartitionSpec()))) is None  # 6 experts, 4 devices
