"""Engine generation: continuous batching, sampling semantics, logprobs, stops, bad requests."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(max_batch=8, max_seq_len=128, decode_steps=4)) as eng:
        yield eng


def test_more_prompts_than_slots_all_complete_in_input_order(engine):
    prompts = [[5 + i, 17, 42 + i] for i in range(20)]
    outs = engine.generate(prompts, GREEDY)
    assert [o.prompt_index for o in outs] == list(range(20))
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in outs)
    assert [list(o.prompt_token_ids) for o in outs] == prompts


def test_greedy_output_equals_a_request_run_alone(engine):
    alone = engine.generate([[7, 8, 9]], GREEDY)[0].token_ids
    crowd = engine.generate([[1, 2]] * 5 + [[7, 8, 9]] + [[3, 4, 5, 6]] * 5, GREEDY)
    assert crowd[5].token_ids == alone


def test_seeded_sampling_is_independent_of_the_rest_of_the_batch(engine):
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=123, n=3)
    alone = engine.generate([[11, 12, 13]], sp)
    other = SamplingParams(max_tokens=20, temperature=0.7, seed=9, n=2)
    futures = [engine.submit([4, 4, 4], other) for _ in range(2)]
    mixed = engine.submit([11, 12, 13], sp).result()
    for f in futures:
        f.result()
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]


def test_n_samples_of_a_prompt_differ_and_carry_their_indices(engine):
    outs = engine.generate([[21, 22, 23]], SamplingParams(max_tokens=16, temperature=1.0, n=4, seed=5))
    assert [o.sample_index for o in outs] == [0, 1, 2, 3]
    assert len({o.token_ids for o in outs}) > 1


def reference_logits(engine: Engine, out) -> np.ndarray:
    """Float64 logits (new tokens, V) that predicted each of `out`'s tokens, from a full forward
    over prompt + completion (no KV cache)."""
    import jax

    from rollout.models import forward

    seq = np.array([list(out.prompt_token_ids) + list(out.token_ids)])
    logits = jax.jit(lambda p, t, m: forward.forward_full(engine.model_def.bind(p), t, m))(
        engine.current_params(), seq, np.ones_like(seq)
    )
    return np.asarray(logits, np.float64)[0, len(out.prompt_token_ids) - 1 : -1]


def log_softmax_at(logits: np.ndarray, tokens) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return logp[np.arange(len(tokens)), list(tokens)]


def test_logprobs_are_those_of_the_sampled_distribution(engine):
    """log_softmax(logits / T) of the untruncated distribution, recomputed by a full forward."""
    temperature = 0.8
    sp = SamplingParams(max_tokens=10, temperature=temperature, top_k=20, seed=3, ignore_eos=True)
    out = engine.generate([[31, 32, 33, 34]], sp)[0]
    expected = log_softmax_at(reference_logits(engine, out) / temperature, out.token_ids)
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)


def test_greedy_logprobs_are_the_raw_log_softmax(engine):
    out = engine.generate([[41, 42]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    np.testing.assert_allclose(out.logprobs, log_softmax_at(reference_logits(engine, out), out.token_ids), atol=1e-4)


@pytest.mark.parametrize("temperature", [1e-3, 1e-6, 1e-8, 1e-12, 1e-30, 1e-40])
def test_logprobs_near_zero_temperature_are_finite_and_those_of_the_sharpened_distribution(engine, temperature):
    """log_softmax(logits / T), which tends to 0 for the top token as T -> 0; tokens are the
    greedy ones. Below float32's smallest normal number T is served as that number."""
    from rollout.engine.native.sampling import MIN_TEMPERATURE

    sp = SamplingParams(max_tokens=6, temperature=temperature, seed=0, ignore_eos=True)
    out = engine.generate([[41, 42]], sp)[0]
    greedy = engine.generate([[41, 42]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == greedy.token_ids
    assert np.all(np.isfinite(out.logprobs)) and max(out.logprobs) <= 0.0
    expected = log_softmax_at(reference_logits(engine, out) / max(temperature, MIN_TEMPERATURE), out.token_ids)
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)


def test_stop_token_id_ends_the_sample_with_reason_stop(engine):
    free = engine.generate([[7, 8, 9]], GREEDY)[0].token_ids
    stop_at = free[3]
    first = free.index(stop_at)
    out = engine.generate([[7, 8, 9]], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_at,)))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free[: first + 1]


def test_stop_string_cuts_the_text_before_it(engine):
    free = engine.generate([[7, 8, 9]], GREEDY)[0]
    stop = free.text[4:6]
    assert stop, "the greedy text is too short to pick a stop string"
    out = engine.generate([[7, 8, 9]], SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]


def test_checkpoint_eos_ends_the_sample_unless_ignored(engine, tiny_qwen3, tmp_path):
    """Point generation_config's EOS at the greedy path's 3rd token: generation stops there."""
    import json
    import shutil

    free = engine.generate([[7, 8, 9]], GREEDY)[0].token_ids
    ckpt = Path(shutil.copytree(tiny_qwen3, tmp_path / "eos"))
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["eos_token_id"] = [free[2]]
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["eos_token_id"] = free[2]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with Engine(ckpt, EngineConfig(max_batch=2, max_seq_len=64)) as eng:
        assert free[2] in eng.eos_ids
        stopped = eng.generate([[7, 8, 9]], SamplingParams(max_tokens=12, temperature=0.0))[0]
        ignored = eng.generate([[7, 8, 9]], GREEDY)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free[: free.index(free[2]) + 1]
    assert ignored.finish_reason == "length" and ignored.token_ids == free


def test_text_is_the_incremental_decode_of_the_tokens(engine):
    outs = engine.generate([[101, 102]], SamplingParams(max_tokens=24, temperature=1.0, seed=1, n=4, ignore_eos=True))
    for o in outs:
        assert o.text == engine.tokenizer.decode(list(o.token_ids))


def test_string_and_chat_prompts_are_encoded(engine):
    s = engine.generate(["hello world"], GREEDY)[0]
    assert list(s.prompt_token_ids) == engine.tokenizer.encode("hello world")
    chat = [{"role": "user", "content": "你是谁"}]
    c = engine.generate([chat], GREEDY)[0]
    assert list(c.prompt_token_ids) == engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)


@pytest.mark.parametrize(
    "prompt, sampling, message",
    [
        ([], SamplingParams(max_tokens=4), "empty prompt"),
        ([1, 2, 10_000], SamplingParams(max_tokens=4), "outside the vocabulary"),
        ([1] * 120, SamplingParams(max_tokens=20), "exceeds max_seq_len"),
        ([1, 2], SamplingParams(max_tokens=4, n=9), "max_batch"),
        ([1, "a"], SamplingParams(max_tokens=4), "integers"),
    ],
)
def test_bad_request_raises_before_queueing_and_others_are_unaffected(engine, prompt, sampling, message):
    before = engine.generate([[7, 8, 9]], GREEDY)[0].token_ids
    queued = engine.status()["queue_depth"]
    with pytest.raises((ValueError, TypeError), match=message):
        engine.generate([[7, 8, 9], prompt], sampling)
    assert engine.status()["queue_depth"] == queued
    assert engine.generate([[7, 8, 9]], GREEDY)[0].token_ids == before


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_k=-1), "top_k"),
        (dict(seed=-3), "seed"),
    ],
)
def test_invalid_sampling_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**kwargs)


def test_cancel_ends_a_running_request_with_abort_and_keeps_its_tokens(engine):
    import time

    future = engine.submit([7, 8, 9], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True, n=2))
    deadline = time.monotonic() + 30
    while engine.status()["active_slots"] < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.cancel(future)
    outs = future.result(30)
    assert [o.finish_reason for o in outs] == ["abort", "abort"]
    assert all(len(o.token_ids) < 100 for o in outs)
    assert engine.status()["active_slots"] == 0
    assert not engine.cancel(future)


class _HoldingSink:
    """A stream sink that holds the scheduler thread inside its update for token `at_token`
    until `go` is set: the request is caught in the middle of accepting a step's tokens."""

    def __init__(self, at_token: int):
        self.at_token = at_token
        self.reached = threading.Event()
        self.go = threading.Event()

    def update(self, sample) -> None:
        if len(sample.tokens) == self.at_token and not self.reached.is_set():
            self.reached.set()
            self.go.wait(30)


def _submit_held(engine, max_tokens: int, at_token: int):
    sink = _HoldingSink(at_token)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    future = engine.submit([7, 8, 9], sampling, sink=sink)
    assert sink.reached.wait(30)
    return future, sink


def test_a_cancel_that_returns_true_wins_over_the_token_that_would_have_finished_the_request(engine):
    # held after token 2 of 3, inside the decode call (4 steps) that also sampled token 3, whose
    # acceptance would end the request with "length" before the scheduler sees the cancel
    future, sink = _submit_held(engine, 3, at_token=2)
    assert engine.cancel(future)
    sink.go.set()
    (out,) = future.result(30)
    assert out.finish_reason == "abort" and len(out.token_ids) == 2


def test_a_cancel_after_the_last_token_was_accepted_returns_false_and_the_result_stands(engine):
    future, sink = _submit_held(engine, 1, at_token=1)  # its only token is accepted: finished
    assert not future.done()  # caught before the future resolves
    assert not engine.cancel(future)
    sink.go.set()
    (out,) = future.result(30)
    assert out.finish_reason == "length" and len(out.token_ids) == 1
