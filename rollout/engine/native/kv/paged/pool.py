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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

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
    free_pages: int
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

    def __init__(self, num_pages: int, page_size: int):
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

    # -- queries ------------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

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
        used = self.num_pages - len(self._free)
        return PoolStats(
            num_pages=self.num_pages,
            page_size=self.page_size,
            used_pages=used,
            free_pages=len(self._free),
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
            self._free.append(page)
            return True
        return False

    # -- allocation ---------------------------------------------------------------------------

    def admit_group(self, seqs: Sequence[SeqId], prompt_len: int) -> bool:
        """Give each of `seqs` a table for a shared `prompt_len`-token prompt, all or nothing.

        The prompt's full pages are shared by all of `seqs`; each gets a private copy of the
        partial last page, if any. False, with nothing allocated, if the pages do not fit (how
        much room to keep for growth is the scheduler's admission plan, not the pool's).
        """
        if not seqs:
            raise ValueError("admit_group needs at least one sequence")
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        if len(set(seqs)) != len(seqs) or any(s in self._tables for s in seqs):
            raise ValueError(f"sequences {list(seqs)} must be distinct and hold no pages yet")
        need = self.group_pages(prompt_len, len(seqs))
        if need > len(self._free):
            return False
        full, tail = divmod(prompt_len, self.page_size)
        shared = self._take(full)
        for page in shared:
            self._hold(page, len(seqs))
        for seq in seqs:
            own = self._take(1) if tail else []
            for page in own:
                self._hold(page, 1)
            self._tables[seq] = shared + own
            self._lengths[seq] = prompt_len
        return True

    def grow(self, seq: SeqId, length: int) -> bool:
        """Make `seq`'s pages cover positions [0, length). False (nothing allocated) if the
        pool is short; the caller then preempts someone and tries again."""
        table = self._tables[seq]
        extra = pages_for(length, self.page_size) - len(table)
        if extra > len(self._free):
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
        return sum(self._release(page) for page in table)

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
        if pages_needed <= len(self._free):
            return []
        dropped: dict[int, int] = {}
        freed = len(self._free)
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
        if count > len(self._free):
            raise PoolExhaustedError(f"asked for {count} pages, {len(self._free)} free of {self.num_pages}")
        return [self._free.pop() for _ in range(count)]

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
        assert free == {p for p in range(self.num_pages) if counts[p] == 0}, "free list != unreferenced pages"
