"""PagePool: host-side bookkeeping of a paged KV cache (no jax, no device memory).

The device holds `num_pages` pages of `page_size` token positions each (per layer, K and V).
Every sequence owns a page table: the list of pages holding its positions 0, 1, ... in order
(position p lives in page `table[p // page_size]` at offset `p % page_size`). A page may appear
in several tables; its reference count is the number of tables holding it, and it returns to
the free list when that count drops to zero.

Sharing. The n samples of one prompt (`admit_group`) share the prompt's *full* pages. The
prompt's last, partial page is the one the samples write next, so each sample gets its own copy
of it (copy-on-write, resolved at admission: the prefill writes the tail's K/V into every
sample's copy directly, so no device copy is ever needed). Pages a sequence grows into are its
own. Hence the invariant: only full pages are shared; a page a sequence still writes into is
private to it.

Lifecycle: `admit_group` (all or nothing) -> `grow` before each decode call (False when the
pool is short: the caller preempts) -> `free` on finish or cancel, or `preempt` (free, counted:
the sequence is recomputed later by a new `admit_group` of prompt + generated tokens).
`victims` picks which sequences to preempt (youngest first) to free a number of pages.

Prefix cache (`prefix_cache=True`; rollout.engine.native.kv.paged.prefix_cache). A prompt's
full pages are published once prefilled (`register`), and `admit_cached` starts a new group's
table with the cached pages its tokens begin with (held by one more table each), so its prefill
covers only the rest. A cached page nobody holds is *idle*: it counts as free, and `_take`
evicts idle pages (least recently released first) only once the free list is empty; a held page
is never evicted. `drop_cache` forgets every entry (a weight swap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

from rollout.engine.native.kv.paged.prefix_cache import PrefixCache

SeqId = Hashable
S = TypeVar("S", bound=Hashable)  # victims() returns the caller's own sequence type


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` positions.

    >>> pages_for(0, 16), pages_for(1, 16), pages_for(16, 16), pages_for(17, 16)
    (0, 1, 1, 2)
    """
    return -(-tokens // page_size)


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """What `status()` shows about the pool."""

    num_pages: int
    page_size: int
    used_pages: int  # pages held by at least one sequence
    free_pages: int  # pages no sequence holds (cached idle pages included)
    shared_pages: int  # pages held by more than one sequence right now
    sequences: int  # sequences holding pages
    tokens: int  # positions allocated over all sequences (shared pages counted once per holder)
    preemptions: int  # sequences preempted since the pool was made
    pages_saved_by_sharing: int  # sum over pages of (holders - 1): pages a private layout would add

    @property
    def use(self) -> float:
        """Fraction of the pool's pages in use."""
        return self.used_pages / self.num_pages if self.num_pages else 0.0


class PoolExhaustedError(RuntimeError):
    """An allocation the caller promised would fit did not (a scheduler bug, not a user error)."""


class PagePool:
    """Page tables and reference counts over `num_pages` pages of `page_size` positions."""

    def __init__(self, num_pages: int, page_size: int, *, prefix_cache: bool = False):
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"a page pool needs num_pages >= 1 and page_size >= 1; got {num_pages} and {page_size}"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        # Low page ids first: a fresh pool hands out 0, 1, 2, ... (deterministic, easy to read).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self._tables: dict[SeqId, list[int]] = {}
        self._lengths: dict[SeqId, int] = {}  # positions each sequence's pages cover
        self.preemptions = 0
        # Kept as references change, so stats() costs nothing whatever the pool size.
        self._entries = 0  # page-table entries over all sequences (sum of reference counts)
        self._shared = 0  # pages with more than one holder
        self.cache = PrefixCache(page_size) if prefix_cache else None

    # -- queries ------------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        """Pages no sequence holds: the free list and the idle cached pages."""
        return len(self._free) + self._idle()

    @property
    def used_pages(self) -> int:
        return self.num_pages - self.free_pages

    def _idle(self) -> int:
        return self.cache.idle_pages if self.cache is not None else 0

    def __contains__(self, seq: SeqId) -> bool:
        return seq in self._tables

    def table(self, seq: SeqId) -> list[int]:
        """The pages of `seq`, in position order (a copy)."""
        return list(self._tables[seq])

    def pages_held(self, seq: SeqId) -> int:
        return len(self._tables[seq])

    def shared_prefix(self, seq: SeqId) -> tuple[int, float]:
        """The leading pages of `seq`'s table it shares with other sequences (only full prompt
        pages are ever shared, so they lead), and its share of them: the sum of 1 / holders."""
        count, share = 0, 0.0
        for page in self._tables[seq]:
            if self._refs[page] == 1:
                break
            count, share = count + 1, share + 1 / self._refs[page]
        return count, share

    def capacity(self, seq: SeqId) -> int:
        """Positions `seq`'s pages can hold (a multiple of page_size)."""
        return self.pages_held(seq) * self.page_size

    def group_pages(self, prompt_len: int, n: int) -> int:
        """Pages `admit_group` takes for an n-sample group of a `prompt_len`-token prompt."""
        full, tail = divmod(prompt_len, self.page_size)
        return full + (n if tail else 0)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def stats(self) -> PoolStats:
        used = self.used_pages
        return PoolStats(
            num_pages=self.num_pages,
            page_size=self.page_size,
            used_pages=used,
            free_pages=self.free_pages,
            shared_pages=self._shared,
            sequences=len(self._tables),
            tokens=self._entries * self.page_size,
            preemptions=self.preemptions,
            pages_saved_by_sharing=self._entries - used,
        )

    def _hold(self, page: int, holders: int) -> None:
        """A fresh page taken by `holders` tables."""
        self._refs[page] = holders
        self._entries += holders
        self._shared += holders > 1

    def _release(self, page: int) -> bool:
        """One holder lets go of `page`; True if it became free."""
        self._shared -= self._refs[page] == 2
        self._refs[page] -= 1
        self._entries -= 1
        assert self._refs[page] >= 0, f"page {page} released more often than taken"
        if self._refs[page] == 0:
            if self.cache is not None and page in self.cache:
                self.cache.released(page)  # stays findable, idle, until evicted
            else:
                self._free.append(page)
            return True
        return False

    def _share(self, page: int, holders: int) -> None:
        """A cached page taken by `holders` more tables (an idle one is reused)."""
        assert self.cache is not None
        if self._refs[page] == 0:
            self.cache.reused(page)
        self._shared += self._refs[page] <= 1 < self._refs[page] + holders
        self._refs[page] += holders
        self._entries += holders

    # -- allocation ---------------------------------------------------------------------------

    def admit_group(self, seqs: Sequence[SeqId], prompt_len: int) -> bool:
        """Give each of `seqs` a table for a shared `prompt_len`-token prompt, all or nothing.

        The prompt's full pages are shared by all of `seqs`; each gets a private copy of the
        partial last page, if any. False, with nothing allocated, if the pages do not fit (how
        much room to keep for growth is the scheduler's admission plan, not the pool's).
        """
        return self._admit(seqs, prompt_len, []) is not None

    def admit_cached(self, seqs: Sequence[SeqId], tokens: Sequence[int], *, reuse: bool = True) -> int | None:
        """`admit_group` for the prompt `tokens`, its leading full pages taken from the prefix
        cache where they are cached (`reuse`; never the page of the last token: its logits are
        computed by the prefill). Returns the positions found cached (a multiple of page_size:
        the prefill starts there), or None, with nothing allocated, if the rest does not fit."""
        if self.cache is None or not reuse:
            return 0 if self._admit(seqs, len(tokens), []) is not None else None
        hits = self.cache.match(tokens, (len(tokens) - 1) // self.page_size)
        start = self._admit(seqs, len(tokens), hits)
        if start is not None:
            self.cache.counted(len(hits))
        return start

    def first_miss(self, tokens: Sequence[int]) -> tuple[int, ...] | None:
        """The tokens up to the end of the first full page of `tokens` the cache lacks (what an
        admission now would prefill first), or None (cache off, or no full page missing). Two
        prompts with the same first miss share a prefix only one of them should compute.

        >>> pool = PagePool(8, 2, prefix_cache=True)
        >>> pool.first_miss([1, 2, 3, 4, 5])
        (1, 2)
        """
        if self.cache is None:
            return None
        s = self.page_size
        hits = len(self.cache.match(tokens, (len(tokens) - 1) // s))
        if (hits + 1) * s > len(tokens) - 1:  # the rest is the page of the last token: always run
            return None
        return tuple(tokens[: (hits + 1) * s])

    def _admit(self, seqs: Sequence[SeqId], prompt_len: int, hits: list[int]) -> int | None:
        if not seqs:
            raise ValueError("admit_group needs at least one sequence")
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        if len(set(seqs)) != len(seqs) or any(s in self._tables for s in seqs):
            raise ValueError(f"sequences {list(seqs)} must be distinct and hold no pages yet")
        need = self.group_pages(prompt_len, len(seqs)) - len(hits)
        idle_hits = sum(self._refs[page] == 0 for page in hits)  # counted free, but not to take
        if need > self.free_pages - idle_hits:
            return None
        full, tail = divmod(prompt_len, self.page_size)
        for page in hits:  # before `_take`, which could evict them otherwise
            self._share(page, len(seqs))
        fresh = self._take(full - len(hits))
        for page in fresh:
            self._hold(page, len(seqs))
        shared = hits + fresh
        for seq in seqs:
            own = self._take(1) if tail else []
            for page in own:
                self._hold(page, 1)
            self._tables[seq] = shared + own
            self._lengths[seq] = prompt_len
        return len(hits) * self.page_size

    def register(self, seq: SeqId, tokens: Sequence[int], version: int) -> int:
        """Publish the full pages of `seq`'s first `len(tokens)` positions, just prefilled from
        `tokens` by weight `version`, in the prefix cache (if on). Returns the pages added."""
        if self.cache is None:
            return 0
        return self.cache.register(self._tables[seq], tokens, version)

    def drop_cache(self, version: int) -> None:
        """Forget every cached prefix (a swap to weight `version`): idle pages go back to the
        free list, held pages stay with their holders."""
        if self.cache is not None:
            self._free.extend(self.cache.drop(version))

    def grow(self, seq: SeqId, length: int) -> bool:
        """Make `seq`'s pages cover positions [0, length). False (nothing allocated) if the
        pool is short; the caller then preempts someone and tries again."""
        table = self._tables[seq]
        extra = pages_for(length, self.page_size) - len(table)
        if extra > self.free_pages:
            return False
        if length > self._lengths[seq] and self._lengths[seq] % self.page_size:
            # positions from the current length on go into the last page: it must be private
            assert self._refs[table[-1]] == 1, f"{seq!r} would write into shared page {table[-1]}"
        if extra > 0:
            for page in self._take(extra):
                self._hold(page, 1)
                table.append(page)
        self._lengths[seq] = max(self._lengths[seq], length)
        return True

    def free(self, seq: SeqId) -> int:
        """Release `seq`'s pages (finished or cancelled). Returns how many went back to the free
        list (shared pages stay while another sequence holds them). Unknown ids raise KeyError:
        a double free is a bug the pool must not hide."""
        table = self._tables.pop(seq)
        del self._lengths[seq]
        # deepest first: idle cached pages are evicted oldest first, so a chain loses its tail first
        return sum(self._release(page) for page in (reversed(table) if self.cache is not None else table))

    def preempt(self, seq: SeqId) -> int:
        """`free` for a sequence that will be recomputed later; counted in `preemptions`."""
        released = self.free(seq)
        self.preemptions += 1
        return released

    def count_preemption(self) -> None:
        """Count a preemption of a sequence whose pages were freed already (a recompute swap
        that could not re-admit it)."""
        self.preemptions += 1

    def victims(self, youngest_first: Iterable[S], pages_needed: int) -> list[S] | None:
        """The shortest prefix of `youngest_first` whose preemption frees `pages_needed` more
        pages, counting a shared page only once all its holders are in the prefix. None if
        preempting all of them would not be enough."""
        if pages_needed <= self.free_pages:
            return []
        dropped: dict[int, int] = {}
        freed = self.free_pages
        chosen: list[S] = []
        for seq in youngest_first:
            chosen.append(seq)
            for page in self._tables[seq]:
                dropped[page] = dropped.get(page, 0) + 1
                if dropped[page] == self._refs[page]:
                    freed += 1
            if freed >= pages_needed:
                return chosen
        return None

    def _take(self, count: int) -> list[int]:
        """`count` unheld pages: the free list's first, then idle cached ones, oldest first."""
        if count > self.free_pages:
            raise PoolExhaustedError(f"asked for {count} pages, {self.free_pages} free of {self.num_pages}")
        return [self._free.pop() if self._free else self._evict() for _ in range(count)]

    def _evict(self) -> int:
        assert self.cache is not None
        return self.cache.evict_oldest()

    # -- checking -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests call this a lot)."""
        counts = [0] * self.num_pages
        for seq, table in self._tables.items():
            assert len(set(table)) == len(table), f"{seq!r} holds a page twice: {table}"
            assert self._lengths[seq] <= len(table) * self.page_size, f"{seq!r} is longer than its pages"
            for page in table:
                counts[page] += 1
        for seq, table in self._tables.items():
            if self._lengths[seq] % self.page_size:  # a partly written page is written next
                assert self._refs[table[-1]] == 1, f"{seq!r}'s partial last page is shared"
        assert counts == self._refs, "reference counts differ from the page tables"
        assert self._entries == sum(counts) and self._shared == sum(c > 1 for c in counts), "stale counters"
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        idle = set()
        if self.cache is not None:
            self.cache.check(self._refs)
            idle = {p for p in range(self.num_pages) if self.cache.is_idle(p)}
        assert not free & idle, "a cached idle page is on the free list"
        assert free | idle == {p for p in range(self.num_pages) if counts[p] == 0}, "free list != unreferenced pages"
