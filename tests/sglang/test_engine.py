"""The sglang-jax backend in one process: dummy start, syncs in every form, the weight state
machine's guarantees (and the contract every backend shares: tests/weight_contract.py), versions,
the prefix cache at swaps, and the logprobs refusal."""

from __future__ import annotations

import time

import numpy as np
import pytest
from weight_contract import Backend, WeightStateContract

from rollout.engine import EngineConfig, SamplingParams
from rollout.weights.spec import SpecMismatchError
from tests.sglang.helpers import TIMEOUT, greedy, hf_flat, sync, tokens, trainer_pytree

pytestmark = [pytest.mark.sglang, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def engine(ckpt_a):
    from rollout.engine.sglang import create_engine

    eng = create_engine(ckpt_a, EngineConfig(max_batch=4, max_seq_len=128, load_format="dummy"))
    yield eng
    eng.shutdown()


def test_spec_is_the_native_engines_spec(engine):
    from rollout.models.bind import ModelDef

    assert engine.spec == ModelDef.create(engine.model_config, "float32").spec
    assert len(engine._state.table) == len(engine.spec.leaves)


def test_sync_from_hf_dir_gives_transformers_greedy_tokens(engine, refs, ckpt_a):
    version = sync(engine, ckpt_a)
    assert engine.serving_version == version
    assert tokens(engine, refs["prompts"], refs["max_new_tokens"]) == refs["greedy"]["a"]


def test_sync_from_flat_hf_dict_gives_transformers_greedy_tokens(engine, refs, ckpt_b):
    sync(engine, hf_flat(ckpt_b))
    assert tokens(engine, refs["prompts"], refs["max_new_tokens"]) == refs["greedy"]["b"]


def test_sync_from_trainer_pytree_gives_transformers_greedy_tokens(engine, refs, ckpt_a):
    sync(engine, trainer_pytree(ckpt_a))
    assert tokens(engine, refs["prompts"], refs["max_new_tokens"]) == refs["greedy"]["a"]


def test_spec_mismatch_is_refused_and_nothing_changes(engine, refs, ckpt_a):
    sync(engine, ckpt_a)
    before_leaves = list(engine._state.leaves)
    before_version = engine.version
    flat = hf_flat(ckpt_a)
    missing = dict(flat)
    missing.pop("model.norm.weight")
    wrong_shape = dict(flat)
    wrong_shape["model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 5), np.float32)
    for bad in (missing, wrong_shape):
        with pytest.raises(SpecMismatchError, match="does not match the engine's"):
            engine.stage(before_version + 1, bad)
    assert engine.staged_version is None
    assert engine.version == before_version
    assert all(a is b for a, b in zip(engine._state.leaves, before_leaves))
    assert tokens(engine, refs["prompts"], refs["max_new_tokens"]) == refs["greedy"]["a"]


def test_generate_sync_generate_compiles_nothing(engine, refs, ckpt_a, ckpt_b):
    sync(engine, ckpt_a)
    tokens(engine, refs["prompts"], refs["max_new_tokens"])
    before = engine.status()["compiled"]
    sync(engine, hf_flat(ckpt_b))
    after_tokens = tokens(engine, refs["prompts"], refs["max_new_tokens"])
    assert engine.status()["compiled"] == before
    assert after_tokens == refs["greedy"]["b"]


def test_swapped_leaves_keep_the_serving_shardings(engine, ckpt_b):
    layout = engine._state.shapes()
    sync(engine, ckpt_b)
    assert engine._state.shapes() == layout


def test_repeated_prompt_across_a_swap_reuses_no_old_prefix(engine, refs, ckpt_a, ckpt_b):
    """The radix cache holds the prompt's KV under A after the first call; without emptying it
    at the swap, the second call would decode B's tokens on A's prompt KV."""
    prompt = refs["prompts"][1]  # the longest: its whole prefix would be reused
    n = refs["max_new_tokens"]
    sync(engine, ckpt_a)
    assert tokens(engine, [prompt], n) == [refs["greedy"]["a"][1]]
    sync(engine, ckpt_b)
    assert tokens(engine, [prompt], n) == [refs["greedy"]["b"][1]]


def test_without_emptying_the_prefix_cache_a_repeated_prompt_decodes_on_old_kv(engine, refs, ckpt_a, ckpt_b):
    """The control of the test above: the same sequence with the eviction turned off."""
    prompt = refs["prompts"][1]
    n = refs["max_new_tokens"]
    sync(engine, ckpt_a)
    tokens(engine, [prompt], n)
    engine._evict_prefix_on_swap = False
    try:
        sync(engine, ckpt_b)
        stale = tokens(engine, [prompt], n)
    finally:
        engine._evict_prefix_on_swap = True
        sync(engine, ckpt_b)  # empties the cache that still holds A's KV
    assert stale != [refs["greedy"]["b"][1]]
    assert tokens(engine, [prompt], n) == [refs["greedy"]["b"][1]]


def test_abort_drops_the_staged_copy(engine, ckpt_b):
    version = engine.version
    engine.stage_checkpoint(version + 1, ckpt_b)
    assert engine.staged_version == version + 1
    assert engine.abort(version + 1) is True
    assert engine.staged_version is None and engine.version == version
    assert engine.abort() is False


def test_completions_carry_the_version_they_ran_on(engine, refs, ckpt_a, ckpt_b):
    """drain: requests running at a commit finish on the old version; later ones get the new."""
    old = sync(engine, ckpt_a)
    long = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    running = [engine.submit(p, long, return_logprobs=False) for p in refs["prompts"][:2]]
    deadline = time.monotonic() + TIMEOUT
    while engine.status()["active_slots"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    engine.stage_checkpoint(old + 1, ckpt_b)
    engine.commit(old + 1)
    later = engine.submit(refs["prompts"][2], greedy(refs["max_new_tokens"]), return_logprobs=False)
    olds = [c for f in running for c in f.result(TIMEOUT)]
    new = later.result(TIMEOUT)[0]
    assert all(c.weight_version == old and set(c.token_versions) == {old} for c in olds)
    assert all(len(c.token_ids) == 64 for c in olds)  # > 50: see test_long_completions_...
    assert new.weight_version == old + 1 and set(new.token_versions) == {old + 1}
    assert list(new.token_ids) == refs["greedy"]["b"][2]


def test_long_completions_have_their_exact_tokens(engine, refs, ckpt_a):
    """Over 50 tokens, 0.0.2's detokenizer path repeats ids; the adapter reads the scheduler's."""
    sync(engine, ckpt_a)
    n = refs["max_new_tokens"]
    long = tokens(engine, refs["prompts"], 80)
    assert [len(t) for t in long] == [80] * len(refs["prompts"])
    assert [t[:n] for t in long] == refs["greedy"]["a"]  # greedy: the first n are the reference's


def test_logprobs_are_refused_before_queueing_and_the_engine_keeps_serving(engine, refs):
    from rollout.engine.sglang.adapter import LogprobsUnavailableError

    queued = engine.status()["requests_finished"]
    with pytest.raises(LogprobsUnavailableError, match="return_logprobs=False"):
        engine.generate(refs["prompts"][:1], greedy(4), return_logprobs=True)
    with pytest.raises(LogprobsUnavailableError):
        engine.submit(refs["prompts"][0], greedy(4))  # the interface's default asks for them
    assert engine.status()["requests_finished"] == queued
    assert len(tokens(engine, refs["prompts"][:1], 4)[0]) == 4
    assert engine.status()["alive"]


def test_n_samples_and_stops_follow_the_request(engine, refs):
    outs = engine.generate(
        [refs["prompts"][0]], SamplingParams(max_tokens=8, temperature=0.0, n=3, ignore_eos=True), return_logprobs=False
    )
    assert [c.sample_index for c in outs] == [0, 1, 2]
    assert len({c.token_ids for c in outs}) == 1  # greedy: the same continuation three times
    first = outs[0].token_ids[0]
    stopped = engine.generate(
        [refs["prompts"][0]],
        SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(first,)),
        return_logprobs=False,
    )[0]
    assert stopped.token_ids == (first,) and stopped.finish_reason == "stop"
    with pytest.raises(ValueError, match="ignore_eos=True with stop_token_ids"):
        engine.submit(refs["prompts"][0], SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=(first,)), return_logprobs=False)


def test_a_streamed_request_gets_its_tokens_after_every_step_and_they_add_up_to_the_completion(engine, refs, ckpt_a):
    import asyncio

    from rollout.engine.streaming import TokenSink

    class RecordingSink(TokenSink):
        def __init__(self, *args):
            super().__init__(*args)
            self.seen: list[tuple[int, str | None]] = []

        def update(self, sample):
            self.seen.append((len(sample.tokens), sample.finish_reason))
            super().update(sample)

    version = sync(engine, ckpt_a)
    prompt, sampling = refs["prompts"][1], greedy(24)
    want = engine.generate([prompt], sampling, return_logprobs=False, timeout=TIMEOUT)[0]
    loop = asyncio.new_event_loop()
    try:
        sink = RecordingSink(sampling, False, loop)
        got = engine.submit(prompt, sampling, return_logprobs=False, sink=sink).result(TIMEOUT)[0]
        deltas = sink.drain()
    finally:
        loop.close()
    assert got.token_ids == want.token_ids
    running = [n for n, reason in sink.seen if reason is None]
    assert len(running) >= 12 and running == sorted(running) and running[-1] < 24  # step by step, before the end
    assert sink.seen[-1] == (24, "length")
    assert [d.token_ids for d in deltas] == [want.token_ids] and deltas[0].text == want.text
    assert set(deltas[0].token_versions) == {version}


def test_bad_requests_raise_before_queueing(engine):
    with pytest.raises(ValueError):
        engine.submit([], greedy(4), return_logprobs=False)
    with pytest.raises(ValueError):
        engine.submit([1] * 120, greedy(64), return_logprobs=False)  # prompt + max_tokens > max_seq_len
    assert engine.status()["alive"]


@pytest.fixture(scope="module")
def native(ckpt_a):
    import jax

    from rollout.engine.native.engine import Engine

    eng = Engine(ckpt_a, EngineConfig(max_batch=4, max_seq_len=128), jax.devices()[:1])
    yield eng
    eng.shutdown()


def test_greedy_tokens_equal_the_native_engines_before_and_after_syncs(engine, native, refs, ckpt_a, ckpt_b):
    n = refs["max_new_tokens"]
    for ckpt in (ckpt_a, ckpt_b):
        sync(engine, hf_flat(ckpt))
        sync(native, ckpt)
        assert tokens(engine, refs["prompts"], n) == tokens(native, refs["prompts"], n)


def test_a_request_filling_max_seq_len_gets_all_its_tokens(engine, native, ckpt_a):
    """sglang-jax clips new tokens near its context length; the adapter leaves room for rollout's
    rule (prompt + max_tokens <= max_seq_len)."""
    sync(engine, ckpt_a)
    sync(native, ckpt_a)
    prompt = [(7 * i) % 400 + 1 for i in range(100)]
    ours = tokens(engine, [prompt], 28)
    assert len(ours[0]) == 28
    assert ours == tokens(native, [prompt], 28)


@pytest.fixture
def backend(engine, ckpt_a):
    update = hf_flat(ckpt_a)
    refused = {name: a for name, a in update.items() if name != "model.norm.weight"}
    return Backend(engine, update, refused, SpecMismatchError)


class TestWeightStateContract(WeightStateContract):
    """The weight state machine every backend shares (tests/weight_contract.py), on this one."""
