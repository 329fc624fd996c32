"""The prefix cache of the paged KV layout (rollout.engine.native.kv.paged.prefix_cache): a prompt
that starts with cached full pages prefills only the rest and gives what an uncached engine
gives; the n samples share the cached pages; idle pages are evicted under pool pressure and held
ones never; every swap drops the cache (a control shows what stale pages would give); status
counts it all. The pool-level tests run without jax.
"""

from __future__ import annotations

import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.engine.native.kv.paged.pool import PagePool

PAGE = 4
BASE = dict(max_batch=8, max_seq_len=128, decode_steps=4, kv_layout="paged", page_size=PAGE, kv_pages=160)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def system_prompt(seed: int, length: int = 23) -> list[int]:
    """A random shared prefix; each test draws its own, so module-scoped engines' caches do
    not leak hits from one test into another."""
    return np.random.default_rng(seed).integers(3, 250, length).tolist()


@pytest.fixture(scope="module")
def cached(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(**BASE)) as engine:
        yield engine


@pytest.fixture(scope="module")
def uncached(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(**BASE, prefix_cache=False)) as engine:
        yield engine


def kv(engine: Engine) -> dict:
    return engine.status()["kv"]


def assert_same_outputs(got, want) -> None:
    """Same tokens; logprobs equal up to float32 rounding (the cached prefill attends over the
    gathered pages, the uncached one over the fresh K/V: the same sums in another order)."""
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


# -- the pool's bookkeeping ---------------------------------------------------------------------


def test_pool_gives_every_sample_of_a_group_the_cached_pages():
    pool = PagePool(32, PAGE, prefix_cache=True)
    prompt = list(range(10, 23))  # 13 tokens: 3 full pages and a tail
    assert pool.admit_cached(["a"], prompt) == 0
    pool.register("a", prompt, version=0)
    pool.free("a")
    start = pool.admit_cached(["b0", "b1", "b2"], [*prompt, 99])
    assert start == 3 * PAGE
    cached = pool.table("b0")[:3]
    assert all(pool.table(s)[:3] == cached for s in ("b1", "b2"))
    assert [pool.refcount(p) for p in cached] == [3, 3, 3]
    pool.check()


def test_pool_never_reuses_the_page_of_the_prompts_last_token():
    """Its logits come from the prefill, so at least that page's positions run."""
    pool = PagePool(32, PAGE, prefix_cache=True)
    prompt = list(range(10, 18))  # exactly 2 pages
    pool.admit_cached(["a"], prompt)
    pool.register("a", prompt, version=0)
    pool.free("a")
    assert pool.admit_cached(["b"], prompt) == PAGE


def test_pool_evicts_idle_cached_pages_oldest_first_and_never_held_ones():
    pool = PagePool(8, PAGE, prefix_cache=True)
    held, idle = list(range(100, 108)), list(range(200, 208))  # 2 full pages each
    for seq, prompt in (("held", held), ("idle", idle)):
        pool.admit_cached([seq], prompt)
        pool.register(seq, prompt, version=0)
    pool.free("idle")
    assert pool.stats().free_pages == 6 and pool.cache is not None and pool.cache.idle_pages == 2
    assert pool.admit_cached(["big"], list(range(300, 323))) == 0  # 6 pages: the free 4 and the idle 2
    assert pool.cache.stats().evictions == 2
    assert pool.cache.match([*held, 1], 2) == pool.table("held")[:2]  # the held chain is intact
    assert pool.cache.match([*idle, 1], 2) == []  # its pages went to "big"
    pool.check()


def test_pool_drop_forgets_every_entry_and_leaves_held_pages_with_their_holders():
    pool = PagePool(16, PAGE, prefix_cache=True)
    a, b = list(range(100, 109)), list(range(200, 209))
    for seq, prompt in (("a", a), ("b", b)):
        pool.admit_cached([seq], prompt)
        pool.register(seq, prompt, version=0)
    pool.free("b")
    table = pool.table("a")
    pool.drop_cache(version=1)
    assert pool.table("a") == table and pool.stats().free_pages == 16 - len(table)
    assert pool.admit_cached(["a2"], a) == 0 and pool.admit_cached(["b2"], b) == 0
    with pytest.raises(ValueError, match="version 0 offered to a prefix cache of version 1"):
        pool.register("a", a, version=0)
    pool.check()


# -- the engine ---------------------------------------------------------------------------------


def test_a_prompt_sharing_a_cached_prefix_prefills_only_the_rest_with_the_same_output(cached, uncached):
    prefix = system_prompt(1)  # 23 tokens: 5 full pages
    first, second = [*prefix, 5, 6, 7], [*prefix, 9, 10, 11, 12, 13]
    assert_same_outputs(cached.generate([first], GREEDY), uncached.generate([first], GREEDY))
    before = kv(cached)["prefill_tokens"]
    got = cached.generate([second], GREEDY)
    assert kv(cached)["prefill_tokens"] - before == len(second) - 5 * PAGE
    assert_same_outputs(got, uncached.generate([second], GREEDY))


def test_the_n_samples_of_a_request_share_its_cached_prefix(cached, uncached):
    prefix = system_prompt(2)
    cached.generate([[*prefix, 1]], GREEDY)
    sampled = SamplingParams(max_tokens=8, temperature=4.0, seed=3, n=4, ignore_eos=True)
    prompt = [*prefix, 2, 3]
    before = kv(cached)
    got = cached.generate([prompt], sampled)
    after = kv(cached)
    # one prefill of the rest for the four samples, one hit
    assert after["prefill_tokens"] - before["prefill_tokens"] == len(prompt) - 5 * PAGE
    assert after["prefix_cache"]["hit_requests"] - before["prefix_cache"]["hit_requests"] == 1
    assert len({o.token_ids for o in got}) > 1, "seeded samples were meant to differ"
    assert_same_outputs(got, uncached.generate([prompt], sampled))


def test_a_cached_prefix_keeps_the_top_logprobs_of_the_first_token(cached, uncached):
    prefix = system_prompt(9)
    cached.generate([[*prefix, 1]], GREEDY)
    prompt, sampling = [*prefix, 2, 3], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, top_logprobs=3)
    got, want = cached.generate([prompt], sampling)[0], uncached.generate([prompt], sampling)[0]
    assert got.top_logprobs is not None and want.top_logprobs is not None
    np.testing.assert_array_equal(got.top_logprobs.token_ids, want.top_logprobs.token_ids)
    np.testing.assert_allclose(got.top_logprobs.logprobs, want.top_logprobs.logprobs, atol=1e-4)


def test_a_burst_sharing_a_prefix_prefills_it_once(cached, uncached):
    """Requests queued together: the first computes the shared pages, the others wait one pass
    and find them cached."""
    prefix = system_prompt(8)  # 23 tokens: 5 full pages
    prompts = [[*prefix, 40 + i, 50 + i, 60 + i] for i in range(4)]
    before = kv(cached)["prefill_tokens"]
    got = cached.generate(prompts, GREEDY)
    assert kv(cached)["prefill_tokens"] - before == 26 + 3 * (26 - 5 * PAGE)
    assert_same_outputs(got, uncached.generate(prompts, GREEDY))


def test_status_counts_lookups_hits_and_cached_pages(cached):
    prefix = system_prompt(3, length=16)  # 4 full pages
    before = kv(cached)["prefix_cache"]
    cached.generate([[*prefix, 1, 2]], GREEDY)  # a miss: publishes 4 pages
    cached.generate([[*prefix, 3]], GREEDY)  # a hit of 4 pages
    after = kv(cached)["prefix_cache"]
    assert after["lookups"] - before["lookups"] == 2
    assert after["hit_requests"] - before["hit_requests"] == 1
    assert after["hit_tokens"] - before["hit_tokens"] == 4 * PAGE
    assert after["cached_pages"] >= 4 and after["idle_pages"] == after["cached_pages"]  # nothing runs
    assert kv(cached)["pages_used"] == 0


def test_eviction_under_pool_pressure_keeps_outputs_and_spares_pages_in_use(tiny_qwen3, uncached):
    """A pool of 40 pages: each round's 8 requests (a shared prefix, then their own turns) hold
    most of it while they run, and the idle pages of earlier rounds are evicted to make room."""
    config = EngineConfig(**{**BASE, "kv_pages": 40})
    prefix = system_prompt(4, length=12)
    rounds = [[prefix + system_prompt(100 * r + i, length=9) for i in range(8)] for r in range(3)]
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with Engine(tiny_qwen3, config) as engine:
        for prompts in rounds:
            assert_same_outputs(engine.generate(prompts, sampling), uncached.generate(prompts, sampling))
        engine.wait_idle(timeout=60)
        status = kv(engine)
        engine._scheduler.pool.check()  # refcounts, free list and idle pages agree (thread idle)
    assert status["prefix_cache"]["evictions"] > 0
    assert status["prefix_cache"]["hit_requests"] > 0


@pytest.fixture
def swapping(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(**BASE)) as engine:
        yield engine


def rescored(engine: Engine, prompt: list[int], completion) -> np.ndarray:
    """The completion's logprobs on the engine's committed weights, computed from scratch."""
    return np.asarray(engine.score([prompt], [list(completion.token_ids)]).logprobs[0])


def test_a_prompt_repeated_across_a_continue_swap_reads_only_the_new_weights_kv(swapping, tiny_qwen3_perturbed):
    prompt = [*system_prompt(5), 7, 8]
    running = [*system_prompt(6), 9]
    swapping.generate([prompt], GREEDY)  # its pages are cached under version 0
    long = swapping.submit(running, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    before = kv(swapping)["prefix_cache"]
    swapping.stage_checkpoint(1, tiny_qwen3_perturbed)
    swapping.commit(1, policy="continue", wait=True)  # the running request keeps its old pages
    again = swapping.generate([prompt], GREEDY)[0]
    again_running = swapping.generate([running], GREEDY)[0]  # its old prompt pages are not found
    after = kv(swapping)["prefix_cache"]
    long.result(timeout=300)
    assert after["drops"] == 1 and after["version"] == 1
    assert after["hit_requests"] == before["hit_requests"], "a page of the old weights was reused"
    assert again.token_versions == (1,) * len(again.token_ids)
    np.testing.assert_allclose(again.logprobs, rescored(swapping, prompt, again), atol=1e-4)
    np.testing.assert_allclose(again_running.logprobs, rescored(swapping, running, again_running), atol=1e-4)


def test_control_stale_pages_kept_across_a_swap_would_change_the_output(swapping, tiny_qwen3_perturbed, monkeypatch):
    """What the drop prevents: with it disabled, the repeated prompt reuses pages the old weights
    computed, and its logprobs are no longer the new weights' own."""
    prompt = [*system_prompt(7), 7, 8]
    swapping.generate([prompt], GREEDY)
    pool = swapping._scheduler.pool
    monkeypatch.setattr(swapping._scheduler, "_drop_prefix_cache", lambda version: setattr(pool.cache, "version", version))
    swapping.stage_checkpoint(1, tiny_qwen3_perturbed)
    swapping.commit(1, wait=True)
    stale = swapping.generate([prompt], GREEDY)[0]
    assert kv(swapping)["prefix_cache"]["hit_requests"] == 1
    assert np.max(np.abs(np.asarray(stale.logprobs) - rescored(swapping, prompt, stale))) > 1e-2


def test_the_fleet_status_sums_the_workers_prefix_cache_counters():
    from rollout.coordinator.cache_totals import prefix_cache_totals

    counters = dict(cached_pages=3, idle_pages=1, lookups=4, hit_requests=2, hit_tokens=64, evictions=1)
    workers = [{"kv": {"prefix_cache": counters}}] * 2 + [{"error": "no status reply"}, {"kv": {"layout": "contiguous"}}]
    assert prefix_cache_totals(workers) == {"workers": 2, **{k: 2 * v for k, v in counters.items()}}
    assert prefix_cache_totals([{"kv": {"layout": "paged", "prefix_cache": None}}]) is None
