"""Token streaming out of one in-process engine (rollout.engine.streaming), no Ray.

The deltas of a streamed request must add up exactly to the completion the same request gets
without streaming (tokens, text, logprobs, versions), never take text back at a stop string, and
closing the stream early must stop the request at the engine's next step.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from rollout.engine import EngineConfig
from rollout.engine.native.engine import Engine
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.streaming import TokenDelta, merge_deltas, stream_request


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(max_batch=8, max_seq_len=512, decode_steps=4)) as eng:
        yield eng


async def collect(engine, prompt, sampling) -> list[list[TokenDelta]]:
    return [deltas async for deltas in stream_request(engine, prompt, sampling)]


def added_up(batches: list[list[TokenDelta]], n: int) -> list[dict]:
    out = [dict(tokens=[], logprobs=[], versions=[], text="", finish=None) for _ in range(n)]
    for batch in batches:
        for d in batch:
            s = out[d.sample_index]
            assert s["finish"] is None, "a delta came after the sample's last one"
            s["tokens"] += d.token_ids
            s["logprobs"] += d.logprobs
            s["versions"] += d.token_versions
            s["text"] += d.text
            s["finish"] = d.finish_reason
    return out


def test_deltas_add_up_to_the_completion(engine):
    sampling = SamplingParams(max_tokens=40, temperature=0.9, seed=7, n=3, ignore_eos=True)
    prompt = [7, 8, 9, 10]
    batches = asyncio.run(collect(engine, prompt, sampling))
    assert len(batches) > 1  # streamed in pieces
    ref = engine.generate([prompt], sampling)
    for s, c in zip(added_up(batches, 3), ref):
        assert s["tokens"] == list(c.token_ids) and s["text"] == c.text
        assert s["logprobs"] == pytest.approx(list(c.logprobs)) and s["versions"] == list(c.token_versions)
        assert s["finish"] == c.finish_reason == "length"


def test_stop_string_is_never_streamed_then_taken_back(engine):
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    full = engine.generate(["The quick brown fox"], greedy)[0].text
    stop = full[20:24]
    sampling = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,))
    batches = asyncio.run(collect(engine, "The quick brown fox", sampling))
    streamed = added_up(batches, 1)[0]
    assert streamed["text"] == full[: full.find(stop)] and streamed["finish"] == "stop"
    prefix = ""
    for batch in batches:  # no intermediate text ever contains (the start of) the stop string
        prefix += batch[0].text
        assert stop not in prefix


def test_closing_the_stream_cancels_the_request(engine):
    sampling = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
    before = engine.status()["tokens_generated"]

    async def read_two():
        stream = stream_request(engine, [5, 6, 7], sampling)
        async for i, _ in _enumerate(stream):
            if i == 1:
                break
        await stream.aclose()

    asyncio.run(read_two())
    deadline = time.monotonic() + 30
    while engine.status()["active_slots"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.status()["tokens_generated"] - before < 480


async def _enumerate(stream):
    i = 0
    async for item in stream:
        yield i, item
        i += 1


def test_merge_deltas_concatenates_per_sample():
    parts = [TokenDelta(0, (1,), (-0.1,), (0,), "a"), TokenDelta(1, (5,), (-0.5,), (0,), "x"),
             TokenDelta(0, (2, 3), (-0.2, -0.3), (0, 1), "bc", "stop")]
    assert merge_deltas(parts) == [TokenDelta(0, (1, 2, 3), (-0.1, -0.2, -0.3), (0, 0, 1), "abc", "stop"),
                                   TokenDelta(1, (5,), (-0.5,), (0,), "x")]
