"""The engine with kv_layout="paged": the same outputs as the contiguous layout, preemption when
the pool runs out (none lost or returned twice, seeded samples unchanged), pages freed on
finish and cancel, status, the pool-size checks, swaps under pressure, and (both layouts) a
request arriving with a recompute swap. The contiguous engine's generation, weight-swap and
transformers-parity tests run on the paged engine in test_paged_engine_{generation,weights,
numerics}.py.
"""

from __future__ import annotations

import time

import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.engine.native.kv.paged.scheduler import PoolTooSmallError

PROMPTS = [[5 + i, 17, 42 + i, 9, 11][: 2 + i % 4] for i in range(6)]
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, n=2)
SAMPLED = SamplingParams(max_tokens=40, temperature=1.0, top_k=50, seed=7, ignore_eos=True, n=4)
BASE = dict(max_batch=8, max_seq_len=64, decode_steps=4)


@pytest.fixture(scope="module")
def contiguous(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(**BASE)) as engine:
        yield engine


@pytest.fixture(scope="module")
def tight(tiny_qwen3):
    """A pool of 40 pages of 4 positions: 8 slots of 40+ tokens need ~90, and admission reserves
    only the next decode call's pages (kv_admission_ratio=0), so it preempts."""
    config = EngineConfig(**BASE, kv_layout="paged", page_size=4, kv_pages=40, kv_admission_ratio=0.0)
    with Engine(tiny_qwen3, config) as engine:
        yield engine


def tokens(outs) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(o.prompt_index, o.sample_index, o.token_ids) for o in outs]


def test_greedy_outputs_equal_the_contiguous_layout_under_preemption(contiguous, tight):
    before = tight.status()["kv"]["preemptions"]
    want = contiguous.generate(PROMPTS, LONG)
    got = tight.generate(PROMPTS, LONG)
    assert tokens(got) == tokens(want)
    kv = tight.status()["kv"]
    assert kv["preemptions"] > before, "the pool was meant to run out"
    assert kv["pages_used"] == 0 and kv["parked"] == 0


def test_seeded_samples_are_unchanged_by_preemption(contiguous, tight):
    """Each sample's randomness comes from (seed, sample index, position), so recomputing a
    preempted sample continues it exactly."""
    want = contiguous.generate(PROMPTS[:4], SAMPLED)
    got = tight.generate(PROMPTS[:4], SAMPLED)
    assert tokens(got) == tokens(want)


def paged_engine(tiny_qwen3, ratio: float | None, kv_pages: int = 40) -> Engine:
    config = EngineConfig(**BASE, kv_layout="paged", page_size=4, kv_pages=kv_pages, kv_admission_ratio=ratio)
    return Engine(tiny_qwen3, config)


@pytest.fixture(scope="module")
def planned(tiny_qwen3):
    """The pool of `tight` (40 pages of 4) at kv_admission_ratio=1: admission plans every
    sample at its max_tokens. Each test reads the preemptions of its own requests."""
    with paged_engine(tiny_qwen3, 1.0) as engine:
        yield engine


def test_admission_at_ratio_one_never_preempts_and_matches_the_contiguous_layout(contiguous, planned):
    before = planned.status()["kv"]["preemptions"]
    got = planned.generate(PROMPTS, LONG)
    kv = planned.status()["kv"]
    assert tokens(got) == tokens(contiguous.generate(PROMPTS, LONG))
    assert kv["preemptions"] == before and kv["pages_used"] == 0


def test_learned_admission_stops_preempting_once_samples_ran_to_max_tokens(tiny_qwen3):
    """The first round starts from the prior (most samples stop early), over-admits and
    preempts; every sample runs to max_tokens, so the second round expects that and preempts none."""
    with paged_engine(tiny_qwen3, None) as engine:
        engine.generate(PROMPTS, LONG)
        first = engine.status()["kv"]
        engine.generate(PROMPTS, LONG)
        second = engine.status()["kv"]
    assert first["preemptions"] > 0, "the prior was meant to over-admit this workload"
    assert first["admission_ratio"] == 1.0
    assert second["preemptions"] == first["preemptions"]


def test_short_samples_fill_the_pool_beside_a_long_one_without_preemption(tiny_qwen3):
    """One prompt runs to 40 new tokens (11 pages of 4 at the end), 12 others to 4 (2 pages
    each): all 8 rows at their full lengths need 25 pages, the pool has 20, but the short ones
    end long before the long one grows, and admission plans that timeline: 8 decode at once."""
    requests = [([3, 4, 5], 40)] + [([6 + i, 7], 4) for i in range(12)]
    with paged_engine(tiny_qwen3, 1.0, kv_pages=20) as engine:
        futures = [
            engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), prompt_index=i)
            for i, (p, n) in enumerate(requests)
        ]
        outs = [c for f in futures for c in f.result(120)]
        kv = engine.status()["kv"]
    assert [len(o.token_ids) for o in outs] == [n for _, n in requests]
    assert kv["peak_active"] == BASE["max_batch"] and kv["preemptions"] == 0


def test_a_group_that_outgrows_the_pool_alone_is_admitted_and_preempts_its_own_samples(planned):
    """At ratio 1 the plan is bypassed for a request that comes to an idle engine: 4 samples of
    50 tokens need 54 pages of the 40; the youngest samples are preempted and recomputed."""
    before = planned.status()["kv"]["preemptions"]
    outs = planned.generate([list(range(3, 13))], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, n=4))
    kv = planned.status()["kv"]
    assert [len(o.token_ids) for o in outs] == [50] * 4
    assert kv["preemptions"] > before and kv["pages_used"] == 0


def test_every_request_is_returned_once_when_many_compete_for_pages(tight):
    futures = [tight.submit([3 + i, 4, 5], LONG, prompt_index=i) for i in range(10)]
    outs = [c for f in futures for c in f.result(120)]
    assert sorted((o.prompt_index, o.sample_index) for o in outs) == [(i, s) for i in range(10) for s in range(2)]
    assert all(len(o.token_ids) == 40 and o.finish_reason == "length" for o in outs)
    assert tight.status()["kv"]["pages_used"] == 0


def test_a_group_shares_its_prompt_pages_and_cancel_frees_them(tight):
    future = tight.submit(list(range(3, 13)), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, n=4))
    deadline = time.monotonic() + 60
    while tight.status()["active_slots"] < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    kv = tight.status()["kv"]
    assert kv["shared_pages"] == 2  # 10 prompt tokens: 2 full pages of 4, shared by 4 samples
    assert kv["pages_saved_by_sharing"] == 6
    assert tight.cancel(future)
    assert [o.finish_reason for o in future.result(60)] == ["abort"] * 4
    deadline = time.monotonic() + 10
    while tight.status()["kv"]["pages_used"] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert tight.status()["kv"]["pages_used"] == 0


def test_status_shows_the_pool(tight):
    kv = tight.status()["kv"]
    assert kv["layout"] == "paged" and kv["pages"] == 40 and kv["page_size"] == 4
    assert {"pool_use", "shared_pages", "preemptions", "parked", "peak_active", "admission_ratio"} <= kv.keys()


def test_a_group_that_no_empty_pool_holds_fails_with_an_error(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(**BASE, kv_layout="paged", page_size=4, kv_pages=16)) as engine:
        with pytest.raises(PoolTooSmallError, match="needs 17 pages of 4 tokens; the pool has 16"):
            engine.generate([list(range(3, 64))], SamplingParams(max_tokens=3, temperature=0.0, n=2))
        assert engine.generate([[3, 4]], SamplingParams(max_tokens=3, temperature=0.0))[0].finish_reason == "length"


def test_a_pool_smaller_than_one_max_seq_len_sequence_is_refused(tiny_qwen3):
    with pytest.raises(ValueError, match="cannot hold one sequence of max_seq_len=64"):
        Engine(tiny_qwen3, EngineConfig(**BASE, kv_layout="paged", page_size=4, kv_pages=15))


def test_a_memory_fraction_on_cpu_devices_says_to_give_pages(tiny_qwen3):
    with pytest.raises(ValueError, match="give the pool size in pages"):
        Engine(tiny_qwen3, EngineConfig(**BASE, kv_layout="paged", kv_memory_fraction=0.5))


def test_the_default_pool_takes_the_contiguous_layouts_memory(tiny_qwen3):
    from rollout.engine.native.kv.paged.setup import pool_pages

    with Engine(tiny_qwen3, EngineConfig(**BASE, kv_layout="paged", page_size=16)) as engine:
        assert pool_pages(engine.model_def, engine.mesh, engine.config) == 8 * 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_layout="ring"), "kv_layout='ring'"),
        (dict(kv_pages=0), "kv_pages=0"),
        (dict(kv_pages=8, kv_memory_fraction=0.5), "not both"),
        (dict(kv_memory_fraction=1.5), "kv_memory_fraction=1.5"),
        (dict(kv_admission_ratio=1.5), "kv_admission_ratio=1.5"),
        (dict(page_size=0), "page_size=0"),
    ],
)
def test_bad_kv_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


# The swap tests change the `tight` engine's weights: they come last in this module.


def _under_pressure(engine: Engine, prompts, sampling):
    """Submit `prompts`; their futures and the engine's status, once the pool has run out and
    a sequence is parked."""
    futures = [engine.submit(p, sampling, prompt_index=i) for i, p in enumerate(prompts)]
    deadline = time.monotonic() + 120
    while (status := engine.status())["kv"]["parked"] == 0:
        assert time.monotonic() < deadline and not all(f.done() for f in futures), "nothing was preempted"
        time.sleep(0.001)
    return futures, status


def test_drain_finishes_parked_sequences_on_the_old_weights(tight, tiny_qwen3_perturbed):
    old = tight.version
    tight.stage_checkpoint(old + 1, tiny_qwen3_perturbed)
    futures, status = _under_pressure(tight, PROMPTS + PROMPTS, LONG)
    started = status["active_slots"] + status["kv"]["parked"]  # running or parked, parked >= 1
    tight.commit(old + 1, "drain")
    outs = [c for f in futures for c in f.result(120)]
    assert all(len(o.token_ids) == 40 and not o.mixed_versions for o in outs)
    assert sum(o.weight_version == old for o in outs) >= started  # the parked ones resumed on old
    assert tight.generate([[3, 4]], SamplingParams(max_tokens=2, temperature=0.0))[0].weight_version == old + 1


def test_recompute_under_pressure_returns_every_sample_once_ending_on_the_new_weights(tight, tiny_qwen3):
    old = tight.version
    tight.stage_checkpoint(old + 1, tiny_qwen3)
    futures, _ = _under_pressure(tight, PROMPTS, LONG)
    tight.commit(old + 1, "recompute", wait=True, timeout=120)
    outs = [c for f in futures for c in f.result(120)]
    assert sorted((o.prompt_index, o.sample_index) for o in outs) == [(i, s) for i in range(len(PROMPTS)) for s in range(2)]
    for o in outs:
        assert len(o.token_ids) == 40 and o.weight_version == old + 1
        assert list(o.token_versions) == sorted(o.token_versions)
    kv = tight.status()["kv"]
    assert kv["pages_used"] == 0 and kv["parked"] == 0


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_a_request_arriving_with_a_recompute_swap_is_prefilled_once(tiny_qwen3, tiny_qwen3_perturbed, layout):
    """A request queued together with a recompute commit (both seen by one scheduler pass: the
    engine's lock is held across the two calls to make that certain) continues exactly like a
    fresh request on the new weights: it was not prefilled a second time by the swap."""
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    kv = dict(kv_layout="paged", page_size=8) if layout == "paged" else {}
    with Engine(tiny_qwen3, EngineConfig(max_batch=4, max_seq_len=256, **kv)) as engine:
        engine.stage_checkpoint(1, tiny_qwen3_perturbed)
        running = engine.submit([1, 2, 3], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        deadline = time.monotonic() + 60
        while engine.tokens_generated < 10 and time.monotonic() < deadline:
            time.sleep(0.001)
        with engine._lock:
            newcomer = engine.submit([7, 8, 9], greedy)
            engine.commit(1, "recompute")
        got = newcomer.result(60)[0].token_ids
        running.result(60)
        assert got == engine.generate([[7, 8, 9]], greedy)[0].token_ids
