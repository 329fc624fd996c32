"""The decode step's fast paths: sampler argmax, in-place full batches, burst admission, and the
transposed tied output head on CPU."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.engine.native.sampling import first_argmax, stack_sampling
from rollout.testing import make_tiny_checkpoint


def test_first_argmax_equals_jnp_argmax_and_takes_the_first_of_ties():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 300)), jnp.float32)
    assert np.array_equal(np.asarray(first_argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))
    ties = jnp.asarray([[0.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    assert np.asarray(first_argmax(ties)).tolist() == [1, 0]


def test_first_argmax_of_a_row_holding_nan_stays_in_the_vocabulary():
    x = jnp.asarray([[0.0, jnp.nan, 1.0]])
    assert 0 <= int(first_argmax(x)[0]) < 3


@pytest.fixture(scope="module")
def burst_engine(tiny_qwen3):
    config = EngineConfig(max_batch=4, max_seq_len=64, decode_steps=4, max_prefill_batch=2)
    with Engine(tiny_qwen3, config) as engine:
        yield engine


def test_a_full_decode_batch_must_list_slots_in_order(burst_engine):
    runner = burst_engine.runner
    sampling = stack_sampling([], 4)
    with pytest.raises(ValueError, match="in order"):
        runner.decode(np.array([1, 0, 2, 3]), np.zeros(4, np.int32), np.zeros(4, np.int32), sampling)


def test_a_burst_larger_than_max_prefill_batch_decodes_as_one_batch(burst_engine):
    """4 requests, prefilled 2 at a time, then decoded together: 8 tokens after the first are
    2 decode calls of 4 steps over all 4 slots (a chunk running ahead would take a third)."""
    runner = burst_engine.runner
    calls: list[int] = []
    decode = runner.decode

    def counted(slots, *args):
        calls.append(int(np.sum(slots < runner.max_batch)))
        return decode(slots, *args)

    runner.decode = counted
    try:
        outs = burst_engine.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True))
    finally:
        del runner.decode  # back to the class's method
    assert all(len(o.token_ids) == 9 for o in outs)
    assert calls == [4, 4]


def test_the_transposed_tied_head_follows_every_swap(tiny_qwen3, tiny_qwen3_perturbed):
    with Engine(tiny_qwen3, EngineConfig(max_batch=2, max_seq_len=32)) as engine:
        before = np.asarray(engine.runner.derived["head_t"])
        engine.stage_checkpoint(1, tiny_qwen3_perturbed)
        engine.commit(1, wait=True, timeout=60)
        embed = np.asarray(engine.current_params()["embed_tokens"])
        head_t = np.asarray(engine.runner.derived["head_t"])
    assert np.array_equal(head_t, embed.T)
    assert not np.array_equal(head_t, before)


def test_an_untied_model_derives_nothing(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "untied", tie_word_embeddings=False)
    with Engine(path, EngineConfig(max_batch=2, max_seq_len=32)) as engine:
        assert engine.runner.derived == {}
