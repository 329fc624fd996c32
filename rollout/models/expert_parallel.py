"""Expert parallelism: each device runs only the experts it holds, on the tokens routed to them.

With the stacked expert weights split by the "expert" axis over a worker's devices (see
rollout.models.sharding), a global grouped matmul would make XLA gather every expert onto
every device and repeat the whole computation there. `sparse_moe_mlp` instead runs the MoE MLP
under `jax.shard_map` over the mesh axis `tp`:

- tokens, routes and routing weights are replicated (every device sees every token);
- device d holds experts [d * E/n, (d + 1) * E/n) and keeps the (token, expert) slots routed to
  them: it sorts its local slots first, grouped by expert, and multiplies only those rows by
  its local expert slice (`grouped_matmul`), in chunks of `local_rows(M, n)` rows, as many
  chunks as its local slots need (usually one: about M / n rows with M = tokens x top_k);
- each device sums its slots' outputs with their routing weights, and a `psum` over the devices
  adds the partial sums: every token gets all of its k experts, each computed on one device.

So a device multiplies about 1/n of the routed rows (FLOPs and expert-weight reads split by n),
at the cost of one all-reduce of the (tokens, hidden) output per MoE layer. The result is the
single-device `expert_mlp`'s up to float rounding (each expert's rows are the same products;
only the summation order of the k experts across devices differs).

The mesh comes from the expert weights themselves: inside `jax.jit` their abstract value
carries the mesh of the arrays they were called with (`jax.typeof(w).sharding.mesh`), so the
forwards need no mesh argument. One device, weights without a mesh, or an expert count that
the devices do not divide (tensor parallelism inside experts, handled by XLA's partitioner):
the single-device `expert_mlp`, as before.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rollout.models.moe import expert_mlp, grouped_matmul, loop_zeros
from rollout.models.sharding import TP

Array = jax.Array
# Rows a device multiplies per chunk, over the balanced share M / n: a local share up to 25%
# above the mean still takes one chunk; a larger one takes more chunks (never a wrong result).
_CHUNK_SLACK = 1.25


def expert_mesh(w: Array) -> jax.sharding.AbstractMesh | jax.sharding.Mesh | None:
    """The mesh to split the experts of stacked weights `w` (experts, ...) over, or None.

    A mesh with the axis `tp` of n > 1 devices where n divides the expert count: the rule of
    rollout.models.sharding.logical_rules for expert parallelism.
    """
    mesh = getattr(getattr(jax.typeof(w), "sharding", None), "mesh", None)
    if mesh is None or TP not in mesh.axis_names:
        return None
    n = mesh.shape[TP]
    return mesh if n > 1 and w.shape[0] % n == 0 else None


def local_rows(m: int, devices: int) -> int:
    """Rows one device multiplies per chunk out of `m` routed slots: the balanced share with
    slack, rounded up to a multiple of 8, at most m.

    >>> local_rows(256, 4), local_rows(4, 4), local_rows(64, 1)
    (80, 4, 64)
    """
    return min(m, -(-math.ceil(_CHUNK_SLACK * m / devices) // 8) * 8)


def sparse_moe_mlp(
    x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array, impl: str | None = None
) -> Array:
    """`rollout.models.moe.expert_mlp`, expert-parallel when the weights' mesh splits the experts.

    x (N, hidden); ids, weights (N, k); gate, up (experts, hidden, inter); down (experts,
    inter, hidden). Returns (N, hidden) in x's dtype.
    """
    mesh = expert_mesh(gate)
    if mesh is None:
        return expert_mlp(x, ids, weights, gate, up, down, impl)
    n = mesh.shape[TP]
    experts, rep = PartitionSpec(TP), PartitionSpec()

    def local(x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array) -> Array:
        first = jax.lax.axis_index(TP) * gate.shape[0]
        partial = local_expert_mlp(x, ids - first, weights, gate, up, down, local_rows(ids.size, n), impl)
        return jax.lax.psum(partial, TP)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(rep, rep, rep, experts, experts, experts), out_specs=rep
    )(x, ids, weights, gate, up, down)


def local_expert_mlp(
    x: Array,
    ids: Array,
    weights: Array,
    gate: Array,
    up: Array,
    down: Array,
    chunk: int,
    impl: str | None = None,
) -> Array:
    """One device's share of the MoE MLP: the slots routed to the experts it holds.

    x (N, hidden); ids (N, k) relative to this device's first expert (slots outside
    [0, local experts) belong to other devices and contribute nothing); weights (N, k); gate,
    up (local experts, hidden, inter); down (local experts, inter, hidden). The local slots are
    sorted first, grouped by expert, and multiplied `chunk` rows at a time for as many chunks as
    they fill. Returns the weighted sum over the local slots (N, hidden) in x's dtype.
    """
    n, k = ids.shape
    g = gate.shape[0]
    m = n * k
    flat = ids.reshape(-1)  # (M,) slot s = token s // k, rank s % k
    key = jnp.where((flat >= 0) & (flat < g), flat, g)  # other devices' slots: group g, sorted last
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=g + 1)[:g].astype(jnp.int32)  # (g,) local slots per expert
    count = jnp.sum(sizes)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    padded = -(-m // chunk) * chunk
    xs = jnp.pad(x[order // k], ((0, padded - m), (0, 0)))  # (padded, hidden), local slots first

    def one_chunk(c: Array, ys: Array) -> Array:
        lo = c * chunk
        rows = jax.lax.dynamic_slice_in_dim(xs, lo, chunk)  # (chunk, hidden)
        # each expert's rows inside [lo, lo + chunk); rows past the local slots are in no group
        in_chunk = jnp.clip(ends - lo, 0, chunk) - jnp.clip(starts - lo, 0, chunk)
        h = jax.nn.silu(grouped_matmul(rows, gate, in_chunk, impl)) * grouped_matmul(rows, up, in_chunk, impl)
        return jax.lax.dynamic_update_slice_in_dim(ys, grouped_matmul(h, down, in_chunk, impl), lo, 0)

    ys = jax.lax.fori_loop(0, -(-count // chunk), one_chunk, loop_zeros(xs.shape, xs.dtype, xs, gate, up, down))
    ys = jnp.where((jnp.arange(m) < count)[:, None], ys[:m], 0)  # (M, hidden), sorted order
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # back to (token, rank)
    return jnp.sum(y * weights.astype(x.dtype)[..., None], axis=1).astype(x.dtype)
