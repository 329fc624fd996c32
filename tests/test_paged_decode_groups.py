"""How the paged runner batches a decode pass: row buckets finer than powers of two, and short
rows decoded apart from long ones when one call would make them read the long span."""

from __future__ import annotations

import doctest

import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.engine.native.kv.paged import runner as paged_runner
from rollout.engine.native.kv.paged.runner import batch_bucket

CONFIG = dict(max_batch=8, max_seq_len=1024, decode_steps=4)


def test_the_runner_modules_examples_hold():
    assert doctest.testmod(paged_runner).failed == 0


def test_a_row_bucket_pads_by_at_most_a_third():
    for n in range(1, 1025):
        bucket = batch_bucket(n)
        assert n <= bucket and (bucket - n) * 3 <= bucket


def sampled(max_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=40, seed=seed, ignore_eos=True)


@pytest.fixture(scope="module")
def paged(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(**CONFIG, kv_layout="paged", page_size=4)) as engine:
        yield engine


def test_short_rows_beside_long_ones_decode_in_a_call_of_their_own(paged):
    runner = paged.runner
    groups = runner.decode_groups([4, 5, 1000, 6, 1001, 5])
    assert groups == [[0, 1, 3, 5], [2, 4]]  # each in row order
    assert runner.decode_groups([1000, 1001, 1002]) == [[0, 1, 2]]  # one span bucket: one call


def test_one_call_when_a_second_call_costs_more_than_the_span_it_saves(paged):
    runner = paged.runner
    assert runner.decode_groups([4, 10]) == [[0, 1]]  # the same span bucket (the minimum, 16 pages)
    # 7 rows at position 8 (16 pages) beside 1 at 100 (32 pages): what the 7 would not read is
    # less than reading the weights a second time
    positions = [8] * 7 + [100]
    assert runner.span_pages(8 + 4) == 16 and runner.span_pages(100 + 4) == 32
    assert runner.call_cost(8, 32) < runner.call_cost(7, 16) + runner.call_cost(1, 32)
    assert runner.decode_groups(positions) == [list(range(8))]


def test_split_decode_calls_give_the_contiguous_layouts_tokens(tiny_qwen3, paged):
    """Force a split whenever it reads less K/V (no cost per call or row): the seeded samples of
    a mixed-length workload are token for token those of the contiguous layout (each row keeps
    its own sampling row across the two calls)."""
    prompts = [[3 + i, 4, 5] for i in range(5)] + [list(range(3, 203))]  # 5 short prompts and a long one
    lengths = [24, 4, 8, 30, 2, 30]
    calls = []
    runner = paged.runner
    decode_groups = runner.decode_groups

    def spy(positions):
        groups = decode_groups(positions)
        calls.append(len(groups))
        return groups

    runner.call_cost = lambda active, span: runner.block_bytes(runner.decode_batch(active), span)  # no fixed part
    runner.decode_groups = spy
    try:
        got = [paged.submit(p, sampled(n, seed)) for seed, (p, n) in enumerate(zip(prompts, lengths))]
        got_tokens = [f.result(120)[0].token_ids for f in got]
    finally:
        del runner.call_cost, runner.decode_groups
    with Engine(tiny_qwen3, EngineConfig(**CONFIG)) as contiguous:
        want = [contiguous.submit(p, sampled(n, seed)) for seed, (p, n) in enumerate(zip(prompts, lengths))]
        want_tokens = [f.result(120)[0].token_ids for f in want]
    assert max(calls) == 2, "the workload was meant to split"
    assert got_tokens == want_tokens
