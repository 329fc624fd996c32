"""PagePool bookkeeping: page tables, sharing of a prompt's full pages, copy-on-write tails,
growth, freeing, preemption and victim choice (no jax)."""

from __future__ import annotations

import random

import pytest

from rollout.engine.native.kv.paged.pool import PagePool, PoolExhaustedError, pages_for


def test_pages_for_rounds_up():
    assert [pages_for(t, 4) for t in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("num_pages, page_size", [(0, 16), (4, 0)])
def test_a_pool_needs_pages_of_positive_size(num_pages, page_size):
    with pytest.raises(ValueError, match="num_pages >= 1 and page_size >= 1"):
        PagePool(num_pages, page_size)


def test_a_group_shares_the_full_prompt_pages_and_gets_private_tails():
    pool = PagePool(32, 4)
    assert pool.admit_group(["a", "b", "c"], prompt_len=10)  # 2 full pages + a 2-token tail
    tables = [pool.table(s) for s in "abc"]
    assert all(t[:2] == tables[0][:2] for t in tables)
    assert len({t[2] for t in tables}) == 3
    assert [pool.refcount(p) for p in tables[0]] == [3, 3, 1]
    assert pool.used_pages == 2 + 3
    stats = pool.stats()
    assert (stats.shared_pages, stats.pages_saved_by_sharing, stats.sequences) == (2, 4, 3)
    pool.check()


def test_a_prompt_of_whole_pages_shares_every_page_and_grows_into_private_ones():
    pool = PagePool(16, 4)
    assert pool.group_pages(8, 2) == 2
    assert pool.admit_group([0, 1], prompt_len=8)
    assert pool.used_pages == 2
    assert pool.grow(0, 9) and pool.grow(1, 9)
    assert pool.table(0)[:2] == pool.table(1)[:2] and pool.table(0)[2] != pool.table(1)[2]
    pool.check()


def test_admission_is_all_or_nothing():
    pool = PagePool(5, 4)
    assert pool.group_pages(10, 4) == 6
    assert not pool.admit_group([1, 2, 3, 4], prompt_len=10)
    assert pool.free_pages == 5 and 1 not in pool
    pool.check()


def test_shared_prefix_is_the_leading_shared_pages_and_this_holders_share_of_them():
    pool = PagePool(32, 4)
    pool.admit_group(["a", "b", "c", "d"], prompt_len=10)  # 2 full pages shared by 4, a tail each
    assert pool.shared_prefix("a") == (2, 0.5) and pool.pages_held("a") == 3
    pool.free("b")
    pool.free("c")
    assert pool.shared_prefix("a") == (2, 1.0)
    pool.free("d")
    assert pool.shared_prefix("a") == (0, 0.0)  # alone: every page its own


def test_admitting_a_sequence_twice_is_refused():
    pool = PagePool(8, 4)
    pool.admit_group([1], prompt_len=3)
    with pytest.raises(ValueError, match="distinct and hold no pages"):
        pool.admit_group([1], prompt_len=3)
    with pytest.raises(ValueError, match="distinct"):
        pool.admit_group([2, 2], prompt_len=3)


def test_grow_allocates_only_when_a_new_page_starts():
    pool = PagePool(8, 4)
    pool.admit_group([1], prompt_len=3)
    assert pool.grow(1, 4) and len(pool.table(1)) == 1
    assert pool.grow(1, 5) and len(pool.table(1)) == 2
    assert pool.grow(1, 12) and len(pool.table(1)) == 3
    assert pool.capacity(1) == 12
    pool.check()


def test_grow_fails_without_allocating_when_the_pool_is_short():
    pool = PagePool(3, 4)
    pool.admit_group([1], prompt_len=4)
    assert not pool.grow(1, 13)  # needs 3 more, 2 free
    assert pool.table(1) == [0] and pool.free_pages == 2
    pool.check()


def test_freeing_a_group_member_keeps_shared_pages_until_the_last_holder_goes():
    pool = PagePool(16, 4)
    pool.admit_group(["a", "b"], prompt_len=9)  # 2 shared, 2 tails
    assert pool.free("a") == 1  # only its tail
    assert pool.stats().shared_pages == 0 and pool.used_pages == 3
    assert pool.free("b") == 3
    assert pool.free_pages == 16
    pool.check()


def test_a_double_free_raises():
    pool = PagePool(4, 4)
    pool.admit_group([1], prompt_len=2)
    pool.free(1)
    with pytest.raises(KeyError):
        pool.free(1)


def test_preempt_frees_and_counts():
    pool = PagePool(8, 4)
    pool.admit_group([1, 2], prompt_len=6)
    pool.preempt(2)
    assert pool.preemptions == 1 and pool.stats().preemptions == 1
    assert 2 not in pool and pool.table(1) != []
    pool.check()


def test_victims_are_the_youngest_prefix_that_frees_enough():
    pool = PagePool(10, 4)
    pool.admit_group(["old"], prompt_len=16)  # 4 pages
    pool.admit_group(["mid"], prompt_len=8)  # 2 pages
    pool.admit_group(["young"], prompt_len=4)  # 1 page; 3 free
    assert pool.victims(["young", "mid", "old"], 3) == []
    assert pool.victims(["young", "mid", "old"], 4) == ["young"]
    assert pool.victims(["young", "mid", "old"], 6) == ["young", "mid"]
    assert pool.victims(["young", "mid", "old"], 11) is None


def test_victims_count_a_shared_page_only_when_all_holders_go():
    pool = PagePool(6, 4)
    pool.admit_group(["a", "b"], prompt_len=9)  # 2 shared + 2 tails = 4; 2 free
    assert pool.victims(["b"], 3) == ["b"]  # its tail
    assert pool.victims(["b", "a"], 5) == ["b", "a"]  # 1 + 3
    assert pool.victims(["b", "a"], 7) is None


def test_taking_more_than_is_free_is_a_bug_that_raises():
    pool = PagePool(2, 4)
    with pytest.raises(PoolExhaustedError, match="asked for 3 pages, 2 free"):
        pool._take(3)


def test_random_workload_never_loses_or_duplicates_a_page():
    """Admit groups, grow, finish and preempt at random; after every operation the tables,
    reference counts and free list agree, and a drained pool has every page free."""
    rnd = random.Random(0)
    pool = PagePool(40, 4)
    live: list[int] = []  # oldest first
    lengths: dict[int, int] = {}
    next_id = 0
    for _ in range(2000):
        op = rnd.random()
        if op < 0.3:
            n, prompt = rnd.randint(1, 4), rnd.randint(1, 20)
            ids = list(range(next_id, next_id + n))
            if pool.admit_group(ids, prompt):
                next_id += n
                live += ids
                lengths.update(dict.fromkeys(ids, prompt))
        elif op < 0.75 and live:
            seq = rnd.choice(live)
            want = lengths[seq] + rnd.randint(1, 6)
            if not pool.grow(seq, want):
                victims = pool.victims(reversed([s for s in live if s != seq]), pages_for(want, 4) - len(pool.table(seq)))
                for v in victims or []:
                    pool.preempt(v)
                    live.remove(v)
                if victims is not None:
                    assert pool.grow(seq, want)
                    lengths[seq] = want
            else:
                lengths[seq] = want
        elif live:
            seq = rnd.choice(live)
            pool.free(seq)
            live.remove(seq)
        pool.check()
    for seq in live:
        pool.free(seq)
    pool.check()
    assert pool.free_pages == 40 and pool.stats().preemptions > 0
