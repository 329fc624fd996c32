"""Paged admission (rollout.engine.native.kv.paged.admission): the learned expected length, and the projected
peak of the pool's use that an admission must fit (checked against a step-by-step count)."""

from __future__ import annotations

import doctest
import random

import pytest

from rollout.engine.native.kv.paged import admission
from rollout.engine.native.kv.paged.admission import PRESSURE_DECAY, PRIOR_RATIO, LengthEstimate, PlanRow, PoolPlan
from rollout.engine.native.kv.paged.pool import PagePool, pages_for


def row(position: int, end: int, own: int | None = None, prefix: int = 0, share: float = 0.0) -> PlanRow:
    own = pages_for(position, 4) - prefix if own is None else own
    return PlanRow(position=position, end=end, prefix=prefix, prefix_share=share, own=own)


def test_before_any_sequence_finished_the_ratio_is_the_prior():
    assert LengthEstimate().ratio == PRIOR_RATIO


def test_the_learned_ratio_is_the_token_share_of_finished_sequences():
    estimate = LengthEstimate()
    for _ in range(200):
        estimate.finished(100, 400)
        estimate.finished(300, 400)
    assert estimate.ratio == pytest.approx(0.5, abs=0.01)


def test_the_learned_ratio_follows_a_changed_workload():
    estimate = LengthEstimate()
    for _ in range(100):
        estimate.finished(50, 500)
    for _ in range(300):
        estimate.finished(500, 500)
    assert estimate.ratio > 0.99


def test_a_preemption_raises_the_ratio_to_one_and_it_decays_back_to_the_learned_one():
    estimate = LengthEstimate()
    for _ in range(300):
        estimate.finished(100, 1000)
    estimate.preempted()
    assert estimate.ratio == 1.0
    for _ in range(round(0.5 / PRESSURE_DECAY)):
        estimate.decoded()
    assert estimate.ratio == pytest.approx(0.5, abs=0.02)
    for _ in range(round(1 / PRESSURE_DECAY)):
        estimate.decoded()
    assert estimate.ratio == pytest.approx(0.1, abs=0.01)


def test_a_fixed_ratio_is_neither_learned_nor_raised():
    estimate = LengthEstimate(fixed=0.25)
    estimate.finished(1000, 1000)
    estimate.preempted()
    assert estimate.ratio == 0.25


@pytest.mark.parametrize(("ratio", "position", "limit", "end"), [
    (1.0, 10, 100, 100), (0.5, 10, 100, 55), (0.0, 10, 100, 18), (0.0, 10, 13, 13), (0.01, 10, 100, 18),
])
def test_the_expected_end_is_at_least_one_decode_call_and_at_most_the_limit(ratio, position, limit, end):
    assert LengthEstimate(fixed=ratio).end(position, limit, steps=8) == end


def stepwise_peak(rows: list[PlanRow], page_size: int, steps: int) -> float:
    """The pool's use step by step: each row holds pages for min(position + t + steps, end)
    positions (at least what it holds now) until step end - position, then none."""
    peak = 0.0
    for t in range(max(r.end - r.position for r in rows) + 1):
        use = 0.0
        for r in rows:
            if t < max(r.end - r.position, 1):
                covered = min(r.position + t + steps, max(r.end, r.position))
                use += max(r.own, pages_for(covered, page_size) - r.prefix) + r.prefix_share
        peak = max(peak, use)
    return peak


def test_the_projected_peak_equals_a_step_by_step_count():
    rng = random.Random(0)
    for _ in range(200):
        rows = []
        for _ in range(rng.randint(1, 12)):
            position = rng.randint(1, 60)
            rows.append(row(position, position + rng.randint(1, 200)))
        plan = PoolPlan(num_pages=10_000, page_size=4, steps=rng.choice([1, 4, 8]))
        assert plan.peak(rows) == pytest.approx(stepwise_peak(rows, 4, plan.steps))


def test_short_sequences_ending_make_room_for_a_long_one_to_grow():
    """Two sequences that end after 8 tokens and one that runs to 64 positions: the pool never
    holds all three at full length, so a pool smaller than that sum admits them."""
    plan = PoolPlan(num_pages=18, page_size=4, steps=4)
    rows = [row(8, 16), row(8, 16), row(8, 64)]
    assert sum(pages_for(r.end, 4) for r in rows) > 18
    assert plan.peak(rows) == 16  # the long one alone at 64 positions
    assert plan.admit(rows)


def test_a_group_counts_its_shared_prompt_pages_once():
    """Four samples of a 9-token prompt (pages of 4): 2 shared full pages, a private tail page each."""
    plan = PoolPlan(num_pages=100, page_size=4, steps=1)
    group = [row(9, 10, own=1, prefix=2, share=0.5)] * 4
    assert plan.peak(group) == 2 + 4 * 1


def test_a_plan_refuses_rows_that_do_not_fit_and_keeps_what_it_had():
    plan = PoolPlan(num_pages=20, page_size=4, steps=4)
    assert plan.admit([row(8, 40)])  # 10 pages at its end
    assert not plan.admit([row(8, 40), row(8, 40)])  # 30
    assert plan.rows == [row(8, 40)]
    assert plan.admit([row(8, 40)])  # 20: fits exactly


def test_the_admission_modules_examples_hold():
    assert doctest.testmod(admission).failed == 0


def test_the_plan_never_falls_short_of_a_pool_grown_as_the_scheduler_grows_it():
    """Groups of n samples sharing a prompt, all run to max_tokens: a PagePool grown before
    every decode call (to position + steps, at most prompt + max_tokens, as the paged scheduler
    does) and freed as samples end never holds more pages than the plan's peak at ratio 1."""
    rng = random.Random(1)
    for _ in range(100):
        page, steps = rng.choice([4, 16]), rng.choice([1, 4, 8])
        pool = PagePool(100_000, page)
        estimate = LengthEstimate(fixed=1.0)
        plan = PoolPlan(pool.num_pages, page, steps)
        live: list[list[int]] = []  # [id, position, generated, max_tokens, limit]
        for g in range(rng.randint(1, 6)):
            prompt, n, max_tokens = rng.randint(1, 40), rng.randint(1, 4), rng.randint(2, 120)
            ids = [(g, i) for i in range(n)]
            assert pool.admit_group(ids, prompt)
            full, tail = divmod(prompt, page)
            if n == 1:
                row = PlanRow(prompt, estimate.end(prompt, prompt + max_tokens, steps), 0, 0.0, pages_for(prompt, page))
            else:
                row = PlanRow(prompt, estimate.end(prompt, prompt + max_tokens, steps), full, full / n, int(tail > 0))
            plan.rows += [row] * n
            live += [[ids[i], prompt, 1, max_tokens, prompt + max_tokens] for i in range(n)]  # prefill sampled one
        peak = plan.peak()
        while live:
            for seq in live:
                assert pool.grow(seq[0], min(seq[1] + steps, seq[4]))
            assert pool.used_pages <= peak + 1e-9
            for seq in live:
                for _ in range(steps):
                    seq[1], seq[2] = seq[1] + 1, seq[2] + 1
                    if seq[2] >= seq[3]:
                        break
            for seq in [s for s in live if s[2] >= s[3]]:
                pool.free(seq[0])
                live.remove(seq)
