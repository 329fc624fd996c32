"""`rollout bench levers`: every form of the decode step computes the same step (only its time
may differ), and the benchmark writes one row per batch with every form's time."""

from __future__ import annotations

import doctest
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rollout.bench import levers


@pytest.fixture(scope="module")
def tiny():
    sizes = levers.shape_sizes("tiny")
    return sizes, levers.make_weights(sizes, seed=3)


def test_the_levers_doctests_hold():
    result = doctest.testmod(levers)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("form", ["fused", "out_in", "fused_out_in"])
def test_every_float32_form_computes_the_baselines_logits(tiny, form):
    sizes, weights = tiny
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, sizes["hidden"]), dtype=np.float32))
    base = jax.jit(levers.step("baseline", sizes))(levers.form_weights(weights, "baseline"), x)
    other = jax.jit(levers.step(form, sizes))(levers.form_weights(weights, form), x)
    assert other.shape == (4, sizes["vocab"])
    np.testing.assert_allclose(np.asarray(other), np.asarray(base), rtol=1e-4, atol=1e-4)


def test_the_bfloat16_form_holds_bfloat16_weights_and_computes_the_step_within_its_precision(tiny):
    sizes, weights = tiny
    held = levers.form_weights(weights, "bfloat16")
    assert held["head"].dtype == jnp.bfloat16 and held["layers"][0]["q"].dtype == jnp.bfloat16
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, sizes["hidden"]), dtype=np.float32))
    base = np.asarray(jax.jit(levers.step("baseline", sizes))(levers.form_weights(weights, "baseline"), x))
    low = np.asarray(jax.jit(levers.step("bfloat16", sizes))(held, x))
    assert np.abs(low - base).max() < 0.1 * np.abs(base).max()
    assert not np.array_equal(low, base)  # it did compute in bfloat16


def test_the_benchmark_writes_every_forms_time_per_batch(tmp_path):
    out = tmp_path / "levers.json"
    assert levers.main(["--shape", "tiny", "--batches", "1", "2", "--repeats", "1", "--steps", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert set(row["ms"]) == set(levers.FORMS) and all(t > 0 for t in row["ms"].values())
        assert row["speedup"]["baseline"] == 1.0
