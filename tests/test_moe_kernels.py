"""The grouped expert matmul and the sparse MoE MLP against plain references, for every
implementation that runs on CPU (megablox's Pallas kernel in interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rollout.models.moe import expert_mlp, grouped_matmul, tile_plan

CPU_IMPLS = ("looped", "tiled", "megablox_interpret")


def per_group_reference(x: np.ndarray, w: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, start = [], 0
    for g, size in enumerate(sizes):
        out.append(x[start : start + size] @ w[g])
        start += size
    return np.concatenate(out)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("sizes", [[10, 0, 30, 24], [1, 0, 0, 2], [0, 0, 0, 7]], ids=["mixed", "decode", "one-group"])
def test_grouped_matmul_multiplies_each_group_by_its_expert(impl, sizes):
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    x = rng.standard_normal((sum(sizes), 32)).astype(np.float32)
    w = rng.standard_normal((len(sizes), 32, 16)).astype(np.float32)
    got = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32), impl)
    np.testing.assert_allclose(np.asarray(got), per_group_reference(x, w, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_expert_mlp_is_the_weighted_sum_of_each_tokens_experts(impl):
    rng = np.random.default_rng(0)
    n, k, e, h, i = 7, 2, 4, 16, 8
    x = rng.standard_normal((n, h)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.random((n, k)).astype(np.float32)
    gate, up = (rng.standard_normal((e, h, i)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((e, i, h)).astype(np.float32)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    want = np.stack([
        sum(weights[t, r] * (silu(x[t] @ gate[ids[t, r]]) * (x[t] @ up[ids[t, r]])) @ down[ids[t, r]] for r in range(k))
        for t in range(n)
    ])
    got = jax.jit(lambda *a: expert_mlp(*a, impl=impl))(x, ids, weights, gate, up, down)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def compiled_flops(impl: str, tokens: int, k: int, experts: int, hidden: int = 64, inter: int = 32) -> float:
    """XLA's FLOP count of the compiled sparse MoE MLP (CPU), for shapes only."""
    f = jax.jit(lambda x, ids, wts, g, u, d: expert_mlp(x, ids, wts, g, u, d, impl))
    args = (
        jax.ShapeDtypeStruct((tokens, hidden), jnp.float32),
        jax.ShapeDtypeStruct((tokens, k), jnp.int32),
        jax.ShapeDtypeStruct((tokens, k), jnp.float32),
        jax.ShapeDtypeStruct((experts, hidden, inter), jnp.float32),
        jax.ShapeDtypeStruct((experts, hidden, inter), jnp.float32),
        jax.ShapeDtypeStruct((experts, inter, hidden), jnp.float32),
    )
    cost = f.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_the_cpu_expert_matmul_grows_with_top_k_not_with_the_number_of_experts():
    # Every expert on every token would cost experts / k times the routed work: 16x here. The
    # tiled grouped matmul stays within about twice the routed work whatever the expert count.
    tokens, k, hidden, inter = 16, 2, 64, 32
    routed = 3 * 2 * tokens * k * hidden * inter  # gate, up and down of each (token, expert) slot
    few, many = compiled_flops("tiled", tokens, k, 8), compiled_flops("tiled", tokens, k, 64)
    assert many < 1.5 * few
    assert many < 3 * routed
    assert compiled_flops("tiled", tokens, 2 * k, 64) > 1.5 * many  # twice top_k: about twice the work


def looped_work_rows(tokens: int, k: int, experts: int, seed: int = 0) -> int:
    """Rows the CPU default ("looped") multiplies for random routes: tiles run x tile height."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])
    tile, tiles = tile_plan(jnp.asarray(np.bincount(ids.reshape(-1), minlength=experts)), tokens * k)
    return tile * int(tiles)


@pytest.mark.parametrize("tokens", [1, 16, 256], ids=["decode-1", "decode-16", "prefill"])
def test_the_looped_expert_matmul_runs_about_the_routed_rows_whatever_the_number_of_experts(tokens):
    k = 2
    for experts in (8, 64):
        assert tokens * k <= looped_work_rows(tokens, k, experts) < 2 * tokens * k + experts
    assert looped_work_rows(tokens, 2 * k, 64) >= 2 * tokens * k  # twice top_k: at least twice the rows


def test_gradients_flow_through_the_looped_expert_matmul_as_through_the_tiled_one():
    """A trainer differentiates the MoE forward: the looped kernel's traced trip count cannot be
    reverse-differentiated, so its gradient comes from the tiled formulation (equal products)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 8))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 5))
    sizes = jnp.array([3, 0, 7, 2], jnp.int32)

    def loss(impl: str):
        return lambda x, w: jnp.sum(jnp.sin(grouped_matmul(x, w, sizes, impl)))

    looped = jax.jit(jax.grad(loss("looped"), argnums=(0, 1)))(x, w)
    tiled = jax.grad(loss("tiled"), argnums=(0, 1))(x, w)
    for a, b in zip(looped, tiled, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
