"""Mixture-of-experts routing and the grouped expert matmul, as transformers' Qwen3-MoE computes it.

Routing (transformers' Qwen3MoeTopKRouter): router logits `x @ router`, softmax over experts in
float32, the top `k` experts of each token, their probabilities renormalised to sum to 1 when
`norm_topk_prob`, then cast to the activation dtype. Ties: `jax.lax.top_k` takes the lower
expert index first; torch.topk on CPU breaks ties in no documented order (it returned
[6, 5, 4] for the top 3 of eight zeros), so routes equal transformers' wherever the top-k
probabilities are distinct, which random float weights make certain and dummy (all-zero)
routers do not.

Dispatch: each token's k (token, expert) slots are sorted by expert and multiplied by their
expert's weights with a grouped matmul (`grouped_matmul`), so compute grows with
tokens x k, never with the number of experts. A route can be replayed: `route` hooks (see
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


def grouped_matmul(x: Array, w: Array, group_sizes: Array) -> Array:
    """Rows of `x` grouped by expert, each group times its expert's matrix.

    x (M, K) with rows sorted by group (group g is the group_sizes[g] rows after the previous
    groups); w (G, K, N); group_sizes (G,) int32 summing to M. Returns (M, N).

    On GPU this is `jax.lax.ragged_dot` (a native grouped kernel). Elsewhere ragged_dot lowers
    to a dense product with every group's matrix (G times the work), so rows are cut into
    tiles of `tile` rows that each belong to one group, and every tile is multiplied by its
    group's matrix: at most ceil(M / tile) + min(G, M) tiles (each non-empty group wastes less
    than one tile), with `tile` about M / G, so the work is within about twice M x K x N.
    """
    if jax.default_backend() == "gpu":
        return jax.lax.ragged_dot(x, w, group_sizes)
    return _tiled_grouped_matmul(x, w, group_sizes)


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


def expert_mlp(x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array) -> Array:
    """The sparse MoE MLP: each token through its k experts, outputs summed with their weights.

    x (N, hidden); ids, weights (N, k); gate, up (experts, hidden, inter); down (experts, inter,
    hidden). Returns (N, hidden) in x's dtype.
    """
    n, k = ids.shape
    num_experts = gate.shape[0]
    flat = ids.reshape(-1)  # (N*k,) slot s = token s // k, rank s % k
    order = jnp.argsort(flat, stable=True)  # slots sorted by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[order // k]  # (N*k, hidden)
    h = jax.nn.silu(grouped_matmul(xs, gate, group_sizes)) * grouped_matmul(xs, up, group_sizes)
    ys = grouped_matmul(h, down, group_sizes)  # (N*k, hidden), sorted order
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
