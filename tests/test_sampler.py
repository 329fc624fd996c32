"""The on-device sampler's draws: the right distribution, never a token of zero weight, greedy
rows untouched by the sampled ones (rollout.engine.native.sampling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rollout.engine.native.sampling import SamplingRow, _truncate, cdf_block, inverse_cdf, sample, stack_sampling

DRAWS = 40_000


def chi_square_allows(counts: np.ndarray, probs: np.ndarray) -> tuple[bool, float, int]:
    """Pearson's chi-square of `counts` against `probs` over tokens of positive probability,
    against a bound 6 standard deviations above its mean (a false alarm below 1e-4 of runs at
    the smallest degrees of freedom here; the draws are seeded, so each run is the same)."""
    positive = probs > 0
    expected = probs[positive] * counts.sum()
    chi2 = float(np.sum((counts[positive] - expected) ** 2 / expected))
    dof = int(positive.sum()) - 1
    return chi2 < dof + 6 * np.sqrt(2 * dof), chi2, dof


def weights_with_zeros(vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.exponential(size=vocab).astype(np.float32)
    w[rng.random(vocab) < 0.3] = 0.0  # tokens that must never come
    w[-1] = 0.0  # the last token too: where a rounding error would land
    return w


@pytest.mark.parametrize("vocab", [40, 128, 3 * 128 + 17, 20_000 + 3])
def test_inverse_cdf_draws_each_token_with_its_weights_share(vocab):
    w = weights_with_zeros(vocab, seed=vocab)
    if vocab > 1000:  # a few tokens carry the mass, so each expected count stays large
        w[np.random.default_rng(5).permutation(vocab - 1)[200:]] = 0.0
    draws = DRAWS if vocab < 1000 else 5_000  # (draws, vocab) float32 weights stay ~400 MB at most
    uniform = np.random.default_rng(1).random((draws, 2), dtype=np.float32)
    tokens = np.asarray(jax.jit(inverse_cdf)(jnp.broadcast_to(jnp.asarray(w), (draws, vocab)), jnp.asarray(uniform)))
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[w == 0].sum() == 0
    ok, chi2, dof = chi_square_allows(counts, w / w.sum())
    assert ok, f"chi-square {chi2:.1f} over {dof} degrees of freedom"


def test_inverse_cdf_at_the_ends_of_the_unit_interval_takes_the_first_and_last_positive_weights():
    w = np.zeros((2, 3 * 128), np.float32)
    w[:, [5, 140, 200]] = [1e-3, 2.0, 0.25]  # the last positive weight is followed by 183 zeros
    below_one = np.nextafter(np.float32(1), np.float32(0))
    uniform = np.asarray([[0.0, 0.0], [below_one, below_one]], np.float32)
    assert np.asarray(inverse_cdf(jnp.asarray(w), jnp.asarray(uniform))).tolist() == [5, 200]


def test_inverse_cdf_never_draws_a_zero_weight_where_rounding_meets_a_block_edge():
    """A tiny weight at the start of the vocabulary and all else in the last token of the next
    block: targets just past the tiny weight's share fall where cumulative sums round."""
    w = np.zeros(256, np.float32)
    w[5], w[255] = 3 * 2.0**-24, 1.0
    grid = np.linspace(0.0, 1e-6, 4001, dtype=np.float32)
    uniform = np.stack([grid, np.resize(np.asarray([0.0, 0.5, 0.999], np.float32), grid.size)], axis=1)
    tokens = np.asarray(inverse_cdf(jnp.broadcast_to(jnp.asarray(w), (grid.size, 256)), jnp.asarray(uniform)))
    assert set(tokens.tolist()) <= {5, 255}


def test_inverse_cdf_gives_a_row_without_finite_weights_the_last_token():
    w = jnp.asarray([[1.0, jnp.nan, 2.0], [0.0, 0.0, 0.0]], jnp.float32)
    assert np.asarray(inverse_cdf(w, jnp.full((2, 2), 0.5))).tolist() == [2, 2]


def test_the_block_grows_with_the_vocabulary_as_its_square_root():
    assert [cdf_block(v) for v in (40, 16_384, 32_000, 151_936)] == [128, 128, 256, 512]


def test_sampled_rows_follow_softmax_over_temperature_and_greedy_rows_take_the_argmax():
    vocab, temperature = 300, 0.7
    logits = np.random.default_rng(2).normal(0, 2, vocab).astype(np.float32)
    rows = [SamplingRow(temperature=temperature, seed=7, sample_index=i) for i in range(DRAWS)]
    rows[::1000] = [SamplingRow()] * len(rows[::1000])  # greedy rows among them
    params = stack_sampling(rows, DRAWS)
    tokens, logprobs = jax.jit(sample)(jnp.broadcast_to(jnp.asarray(logits), (DRAWS, vocab)), params, jnp.full(DRAWS, 3))
    tokens = np.asarray(tokens)
    greedy = np.zeros(DRAWS, bool)
    greedy[::1000] = True
    assert np.all(tokens[greedy] == np.argmax(logits))
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    ok, chi2, dof = chi_square_allows(np.bincount(tokens[~greedy], minlength=vocab), probs)
    assert ok, f"chi-square {chi2:.1f} over {dof} degrees of freedom"
    np.testing.assert_allclose(np.asarray(logprobs)[~greedy], np.log(probs[tokens[~greedy]]), rtol=1e-4, atol=1e-5)


def test_top_k_and_top_p_rows_draw_only_inside_their_truncation_in_proportion():
    vocab = 200
    logits = np.random.default_rng(3).normal(0, 1.5, vocab).astype(np.float32)
    order = np.argsort(-logits)
    half = DRAWS // 2
    rows = [SamplingRow(temperature=1.0, top_k=10, seed=1, sample_index=i) for i in range(half)]
    rows += [SamplingRow(temperature=1.0, top_p=0.5, seed=2, sample_index=i) for i in range(half)]
    tokens, _ = jax.jit(sample)(jnp.broadcast_to(jnp.asarray(logits), (DRAWS, vocab)), stack_sampling(rows, DRAWS), jnp.zeros(DRAWS, jnp.int32))
    tokens = np.asarray(tokens)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5) + 1)]
    for drawn, kept in ((tokens[:half], order[:10]), (tokens[half:], nucleus)):
        assert set(drawn.tolist()) <= set(kept.tolist())
        truncated = np.zeros(vocab)
        truncated[kept] = probs[kept]
        ok, chi2, dof = chi_square_allows(np.bincount(drawn, minlength=vocab), truncated / truncated.sum())
        assert ok, f"chi-square {chi2:.1f} over {dof} degrees of freedom"


def test_a_top_p_of_one_keeps_every_token_beside_rows_that_truncate():
    """A row with top_p = 1 next to a truncating row keeps its whole distribution, also the
    tokens whose float32 cumulative mass before them rounds to 1."""
    vocab = 2000
    logits = np.zeros(vocab, np.float32)
    logits[:10] = 25.0  # ten tokens hold all but ~1e-8 of the mass
    rows = [SamplingRow(temperature=1.0, top_p=1.0, seed=3, sample_index=i) for i in range(4)]
    rows.append(SamplingRow(temperature=1.0, top_p=0.5, seed=4))  # makes the batch truncate
    params = stack_sampling(rows, 5)
    truncated = _truncate(jnp.asarray(np.broadcast_to(logits - logits.max(), (5, vocab))), params.top_k, params.top_p)
    assert bool(jnp.all(jnp.isfinite(truncated[:4])))


def test_a_seeded_row_draws_the_same_token_whatever_the_other_rows_are():
    logits = jnp.asarray(np.random.default_rng(4).normal(0, 1, (3, 500)), jnp.float32)
    alone = stack_sampling([SamplingRow(temperature=1.0, seed=11, sample_index=2)] * 3, 3)
    mixed = stack_sampling([SamplingRow(temperature=1.0, seed=11, sample_index=2), SamplingRow(), SamplingRow(0.3, 5, 0.9, 3, 1)], 3)
    position = jnp.asarray([9, 9, 9])
    assert int(sample(logits, alone, position)[0][0]) == int(sample(logits, mixed, position)[0][0])
