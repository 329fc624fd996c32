"""Top-k alternatives per generated token (SamplingParams.top_logprobs) on the native engine:
computed on the device with the sampled token's logprob, for both KV layouts, and free when off."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine_generation import reference_logits

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.alternatives import MAX_TOP_LOGPROBS
from rollout.engine.native.engine import Engine
from rollout.engine.native.sampling import SamplingRow, sample_top, stack_sampling


@pytest.fixture(scope="module", params=["contiguous", "paged"])
def engine(request, tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(max_batch=4, max_seq_len=128, decode_steps=4, kv_layout=request.param)) as eng:
        yield eng


def reference_top(engine: Engine, out, temperature: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n most likely tokens of log_softmax(logits / T) at each completion position, recomputed
    by a full forward over prompt + completion (float64)."""
    logits = reference_logits(engine, out) / temperature
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    ids = np.argsort(-logp, axis=-1, kind="stable")[:, :n]
    return ids, np.take_along_axis(logp, ids, axis=-1)


def test_greedy_top_logprobs_are_the_most_likely_tokens_led_by_the_sampled_one(engine):
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, top_logprobs=5)
    out = engine.generate([[31, 32, 33, 34]], sp)[0]
    top = out.top_logprobs
    assert top is not None and top.token_ids.shape == top.logprobs.shape == (10, 5)
    assert top.token_ids[:, 0].tolist() == list(out.token_ids)
    np.testing.assert_array_equal(top.logprobs[:, 0], np.asarray(out.logprobs, np.float32))
    ids, logprobs = reference_top(engine, out, 1.0, 5)
    np.testing.assert_array_equal(top.token_ids, ids)
    np.testing.assert_allclose(top.logprobs, logprobs, atol=1e-4)


def test_sampled_top_logprobs_are_those_of_the_tempered_distribution(engine):
    temperature = 0.7
    sp = SamplingParams(max_tokens=12, temperature=temperature, seed=4, ignore_eos=True, top_logprobs=3)
    out = engine.generate([[11, 12, 13]], sp)[0]
    top = out.top_logprobs
    assert top is not None and top.token_ids.shape == (12, 3)
    ids, logprobs = reference_top(engine, out, temperature, 3)
    np.testing.assert_array_equal(top.token_ids, ids)
    np.testing.assert_allclose(top.logprobs, logprobs, atol=1e-4)
    for k, token in enumerate(out.token_ids):  # where the sampled token is listed, the same logprob
        if token in top.token_ids[k]:
            assert top.logprobs[k][top.token_ids[k].tolist().index(token)] == np.float32(out.logprobs[k])


def test_each_sample_keeps_the_number_of_alternatives_it_asked_for(engine):
    few = engine.submit([5, 6, 7], SamplingParams(max_tokens=8, temperature=1.0, seed=1, top_logprobs=2, n=2))
    none = engine.submit([5, 6, 7], SamplingParams(max_tokens=8, temperature=1.0, seed=1, n=2))
    many = engine.submit([5, 6, 7], SamplingParams(max_tokens=8, temperature=1.0, seed=1, top_logprobs=MAX_TOP_LOGPROBS))
    assert [c.top_logprobs.token_ids.shape for c in few.result()] == [(8, 2), (8, 2)]
    assert [c.top_logprobs for c in none.result()] == [None, None]
    assert many.result()[0].top_logprobs.logprobs.shape == (8, MAX_TOP_LOGPROBS)


def test_top_logprobs_do_not_change_the_sampled_tokens(engine):
    sp = SamplingParams(max_tokens=10, temperature=1.0, seed=9, ignore_eos=True)
    plain = engine.generate([[21, 22]], sp)[0]
    with_top = engine.generate([[21, 22]], SamplingParams(**{**sp.__dict__, "top_logprobs": 4}))[0]
    assert with_top.token_ids == plain.token_ids and with_top.logprobs == plain.logprobs


def test_a_step_without_top_logprobs_computes_none():
    """top_n is static: rows that ask for none compile a step with no top-k in it (empty outputs)."""
    import jax.numpy as jnp

    rows = [SamplingRow(temperature=1.0, seed=1)] * 2
    sampling = stack_sampling(rows, 4)
    assert sampling.top_n == 0
    _, _, (ids, logprobs) = sample_top(jnp.zeros((4, 64)), sampling, jnp.zeros((4,), jnp.int32))
    assert ids.shape == logprobs.shape == (4, 0)
    assert stack_sampling([*rows, SamplingRow(top_logprobs=1)], 4).top_n == MAX_TOP_LOGPROBS


def test_top_logprobs_above_the_limit_are_refused_naming_it():
    with pytest.raises(ValueError, match=r"top_logprobs=21 .*\[0, 20\]"):
        SamplingParams(top_logprobs=21)
