"""Mixture-of-experts routing and the grouped expert matmul, as transformers' Qwen3-MoE computes it.

Routing (transformers' Qwen3MoeTopKRouter): router logits `x @ router`, softmax over experts in
float32, the top `k` experts of each token, their probabilities renormalised to sum to 1 when
`norm_topk_prob`, then cast to the activation dtype. Ties: `jax.lax.top_k` takes the lower
expert index first; torch.topk on CPU breaks ties in no documented order (it returned
[6, 5, 4] for the top 3 of eight zeros), so routes equal transformers' wherever the top-k
probabilities are distinct, which random float weights make certain and dummy (all-zero)
routers do not.

Dispatch: each token's k (token, expert) slots are sorted by expert and multiplied by their
expert's weights with a grouped matmul (`grouped_matmul`: ragged_dot on GPU, megablox's gmm on
TPU, a loop over row tiles on CPU), so compute grows with tokens x k, never with the number of
experts. A route can be replayed: `route` hooks (see
`RouteFn`) pick the experts, and the weights are the router's probabilities at the experts
picked, so a replayed route gives the same output as the route it replays on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
# route(moe_layer_index, probs) -> expert ids: probs (B, T, experts) float32 router softmax;
# ids (B, T, k) int32. The default picks the top k (`top_k_experts`); a recorder or a replay
# of given routes is a RouteFn too.
RouteFn = Callable[[int, Array], Array]


def top_k_experts(probs: Array, k: int) -> Array:
    """probs (..., experts) -> the k most probable experts (..., k) int32, most probable first,
    lower index first among equals."""
    return jax.lax.top_k(probs, k)[1].astype(jnp.int32)


def routing_weights(probs: Array, ids: Array, normalize: bool) -> Array:
    """The weight of each routed expert: its router probability (float32), renormalised over
    the k routed experts when `normalize` (norm_topk_prob)."""
    w = jnp.take_along_axis(probs, ids, axis=-1)
    return w / jnp.sum(w, axis=-1, keepdims=True) if normalize else w


GROUPED_MATMULS = ("ragged_dot", "megablox", "megablox_interpret", "looped", "tiled")


def grouped_matmul(x: Array, w: Array, group_sizes: Array, impl: str | None = None) -> Array:
    """Rows of `x` grouped by expert, each group times its expert's matrix.

    x (M, K) with rows sorted by group (group g is the group_sizes[g] rows after the previous
    groups); w (G, K, N); group_sizes (G,) int32 summing to M. Returns (M, N).

    `impl` (None: by backend):
    - "ragged_dot" (GPU): `jax.lax.ragged_dot`, a native grouped kernel there. Elsewhere XLA
      lowers it to a dense product with every group's matrix (G times the work), so:
    - "megablox" (TPU): the Pallas grouped matmul that ships with JAX
      (jax.experimental.pallas.ops.tpu.megablox.gmm); "megablox_interpret" runs it in Pallas'
      interpret mode on any backend (tests on CPU);
    - "looped" (CPU): rows cut into tiles of `tile` = ceil(M / G) rows that each belong to one
      group (`tile_plan`); a loop runs only the tiles the groups fill, each a contiguous slice
      of x times its group's matrix read in place: at most M / tile + min(G, M) tiles (each
      non-empty group wastes less than one tile), so the work stays within about twice
      M x K x N, and no expert's matrix is copied;
    - "tiled": the same tiles as one batched product over every possible tile, with each tile's
      matrix gathered first: static work (XLA's cost analysis counts it), but the gather copies
      a (K, N) matrix per tile, which made it 2-70x slower than "looped" on CPU at decode and
      prefill shapes of the MoE bench.
    Rows past sum(group_sizes) are zero.
    """
    impl = impl or {"gpu": "ragged_dot", "tpu": "megablox"}.get(jax.default_backend(), "looped")
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if impl in ("megablox", "megablox_interpret"):
        return _megablox(x, w, group_sizes, interpret=impl == "megablox_interpret")
    if impl == "looped":
        return _looped_differentiable(x, w, group_sizes)
    if impl == "tiled":
        return _tiled_grouped_matmul(x, w, group_sizes)
    raise ValueError(f"grouped matmul impl={impl!r}; expected one of {GROUPED_MATMULS} or None")


def _megablox(x: Array, w: Array, group_sizes: Array, *, interpret: bool) -> Array:
    """megablox gmm with tiles that divide the shapes: rows padded to a multiple of the row
    tile (the padding rows join the last group and are dropped), K and N tiled by the largest
    of 512/256/128 that divides them, else whole."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    m, k = x.shape
    n = w.shape[2]
    tm = min(128, max(8, -(-m // 8) * 8))
    padded = -(-m // tm) * tm
    if padded != m:
        x = jnp.pad(x, ((0, padded - m), (0, 0)))
        group_sizes = group_sizes.at[-1].add(padded - m)

    def tile(d: int) -> int:
        return next((t for t in (512, 256, 128) if d % t == 0), d)

    out = gmm(x, w, group_sizes.astype(jnp.int32), preferred_element_type=x.dtype,
              tiling=(tm, tile(k), tile(n)), interpret=interpret)
    return out[:m]


def loop_zeros(shape: tuple[int, ...], dtype: jnp.dtype, *operands: Array) -> Array:
    """Zeros to start a loop's carry that the loop fills from `operands`: under shard_map a
    carry must vary over the mesh axes its body's values vary over (the operands'), elsewhere
    plain zeros."""
    axes: set[str] = set()
    for o in operands:
        aval = jax.typeof(o)
        manual = getattr(aval, "manual_axis_type", None)  # where JAX keeps them, by version
        axes |= set(getattr(manual, "varying", None) or getattr(aval, "vma", None) or ())
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def tile_plan(group_sizes: Array, m: int) -> tuple[int, Array]:
    """The "looped" grouped matmul's tiles for `m` rows in groups of `group_sizes` (G,): the
    tile height ceil(m / G) and the number of tiles the groups fill (what the loop runs).

    >>> tile, tiles = tile_plan(jnp.array([3, 0, 5, 0]), 8)
    >>> tile, int(tiles)
    (2, 5)
    """
    tile = max(1, -(-m // group_sizes.shape[0]))
    return tile, jnp.sum(-(-group_sizes.astype(jnp.int32) // tile))


def _looped_grouped_matmul(x: Array, w: Array, group_sizes: Array) -> Array:
    m, g = x.shape[0], w.shape[0]
    tile, num_tiles = tile_plan(group_sizes, m)
    sizes = group_sizes.astype(jnp.int32)
    tiles_per_group = -(-sizes // tile)  # (G,)
    last_tile = jnp.cumsum(tiles_per_group)  # (G,) exclusive end
    first_tile = last_tile - tiles_per_group
    first_row = jnp.cumsum(sizes) - sizes
    xp = jnp.pad(x, ((0, tile), (0, 0)))  # a last tile reads past the rows, never clamped back

    def one_tile(t: Array, y: Array) -> Array:
        group = jnp.clip(jnp.searchsorted(last_tile, t, side="right"), 0, g - 1)
        row = first_row[group] + (t - first_tile[group]) * tile
        rows = jax.lax.dynamic_slice_in_dim(xp, row, tile)  # (tile, K)
        # A tile's rows past its group belong to later groups (sorted): their tiles run later
        # and overwrite them, so every row ends with its own group's product.
        return jax.lax.dynamic_update_slice_in_dim(y, rows @ jax.lax.dynamic_index_in_dim(w, group, keepdims=False), row, 0)

    y = jax.lax.fori_loop(0, num_tiles, one_tile, loop_zeros((m + tile, w.shape[2]), jnp.result_type(x, w), x, w))
    return jnp.where((jnp.arange(m) < jnp.sum(sizes))[:, None], y[:m], 0)


@jax.custom_vjp
def _looped_differentiable(x: Array, w: Array, group_sizes: Array) -> Array:
    """The looped grouped matmul, differentiable: its loop runs a traced number of tiles, which
    reverse-mode autodiff cannot go through, so gradients (a trainer's `jax.grad` through the
    MoE forward) come from the "tiled" formulation of the same product."""
    return _looped_grouped_matmul(x, w, group_sizes)


def _looped_fwd(x: Array, w: Array, group_sizes: Array) -> tuple[Array, tuple[Array, Array, Array]]:
    return _looped_grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _looped_bwd(res: tuple[Array, Array, Array], dy: Array) -> tuple[Array, Array, None]:
    x, w, group_sizes = res
    _, vjp = jax.vjp(lambda x_, w_: _tiled_grouped_matmul(x_, w_, group_sizes), x, w)
    dx, dw = vjp(dy)
    return dx, dw, None


_looped_differentiable.defvjp(_looped_fwd, _looped_bwd)


def _tiled_grouped_matmul(x: Array, w: Array, group_sizes: Array) -> Array:
    m, g = x.shape[0], w.shape[0]
    tile = max(1, -(-m // g))
    num_tiles = m if tile == 1 else -(-m // tile) + min(g, m)
    sizes = group_sizes.astype(jnp.int32)
    tiles_per_group = -(-sizes // tile)  # (G,)
    first_tile = jnp.cumsum(tiles_per_group) - tiles_per_group  # (G,) exclusive
    first_row = jnp.cumsum(sizes) - sizes  # (G,)
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    # group of tile t: the last group whose first tile is <= t (tiles past the last are unused)
    tile_group = jnp.clip(jnp.searchsorted(first_tile + tiles_per_group, t, side="right"), 0, g - 1)
    offset = (t - first_tile[tile_group])[:, None] * tile + jnp.arange(tile, dtype=jnp.int32)[None, :]  # (tiles, tile)
    valid = (offset < sizes[tile_group][:, None]) & (t < jnp.sum(tiles_per_group))[:, None]
    rows = jnp.where(valid, first_row[tile_group][:, None] + offset, m)  # m: out of range, dropped
    xt = x.at[rows].get(mode="fill", fill_value=0)  # (tiles, tile, K)
    yt = jnp.einsum("tmk,tkn->tmn", xt, w[tile_group])  # (tiles, tile, N)
    out = jnp.zeros((m, w.shape[2]), yt.dtype)
    return out.at[rows.reshape(-1)].set(yt.reshape(-1, yt.shape[-1]), mode="drop")


def expert_mlp(
    x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array, impl: str | None = None
) -> Array:
    """The sparse MoE MLP: each token through its k experts, outputs summed with their weights.

    x (N, hidden); ids, weights (N, k); gate, up (experts, hidden, inter); down (experts, inter,
    hidden). Returns (N, hidden) in x's dtype. `impl`: see `grouped_matmul`.
    """
    n, k = ids.shape
    num_experts = gate.shape[0]
    flat = ids.reshape(-1)  # (N*k,) slot s = token s // k, rank s % k
    order = jnp.argsort(flat, stable=True)  # slots sorted by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[order // k]  # (N*k, hidden)
    h = jax.nn.silu(grouped_matmul(xs, gate, group_sizes, impl)) * grouped_matmul(xs, up, group_sizes, impl)
    ys = grouped_matmul(h, down, group_sizes, impl)  # (N*k, hidden), sorted order
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # back to (token, rank)
    return jnp.sum(y * weights.astype(x.dtype)[..., None], axis=1).astype(x.dtype)


class RouteRecorder:
    """A RouteFn that records the experts each MoE layer used, optionally replaying given ones.

    Made inside a jitted function and passed as `route` to a forward; after the forward,
    `routes()` stacks what every MoE layer used: (B, T, moe layers, k) int16. `given`
    (B, T, moe layers, k) with `replay` (B, T) bool: where replay is True the layer uses the
    given experts instead of its router's top k (routing replay; the weights are still the
    router's probabilities at those experts).
    """

    def __init__(self, k: int, given: Array | None = None, replay: Array | None = None):
        self.k, self.given, self.replay = k, given, replay
        self.used: list[Array] = []

    def __call__(self, moe_index: int, probs: Array) -> Array:
        ids = top_k_experts(probs, self.k)
        if self.given is not None and self.replay is not None:
            ids = jnp.where(self.replay[..., None], self.given[:, :, moe_index].astype(jnp.int32), ids)
        self.used.append(ids)
        return ids

    def routes(self, shape: tuple[int, int]) -> Array:
        """(B, T, moe layers, k) int16; (B, T, 0, k) for a model without MoE layers."""
        if not self.used:
            return jnp.zeros((*shape, 0, self.k), jnp.int16)
        return jnp.stack(self.used, axis=2).astype(jnp.int16)
