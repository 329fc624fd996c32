"""PrefixCache: full pages of K/V kept after their sequences end, found again by their tokens.

A prompt's full pages are published here once its prefill has written them (`register`). An
entry is keyed by its parent entry and its page of tokens, a chain from the first page:

    key(page i) = (id of page i - 1's entry, the page_size tokens of page i),   id 0: the root

so a page matches only after the same tokens at every earlier position, and dict lookups are
exact (no hash collision can join two prefixes). A later prompt that starts with the same
tokens finds the chain page by page (`match`) and shares those pages instead of prefilling
them. Only full pages are ever entries: a sequence never writes into a full page again, so an
entry's K/V never change while it lives.

Pages held by no sequence stay cached, *idle*, in least-recently-released order; the pool takes
them (oldest first, `evict_oldest`) only when its free list is empty, so a page in use is never
evicted. A sequence's pages are released deepest first, so a chain is evicted from its tail and
its head (a shared system prompt) lasts longest.

Entries belong to the weight version that computed them (`version`): `drop` forgets every entry
at each swap, and `register` refuses pages of another version. The bookkeeping of who holds a
page is the pool's (`rollout.engine.native.kv.paged.pool.PagePool`); this class never frees or
takes a page by itself. No jax.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Sequence

Key = tuple[int, tuple[int, ...]]  # (parent entry id, the page's tokens)


@dataclasses.dataclass(frozen=True)
class PrefixCacheStats:
    """What `status()` shows about the cache (counters since the engine started)."""

    version: int  # the weight version its entries belong to
    cached_pages: int  # pages findable now (held by sequences or idle)
    idle_pages: int  # cached pages no sequence holds: evicted first-released first under pressure
    lookups: int  # admissions that looked for a cached prefix
    hit_requests: int  # of those, admissions that found at least one page
    hit_tokens: int  # prompt positions taken from the cache instead of prefilled
    evictions: int  # idle pages taken back for new K/V
    drops: int  # swaps that dropped the cache

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class PrefixCache:
    """The index of cached full pages and the order their idle pages are evicted in."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.version = 0
        self._index: dict[Key, int] = {}  # key -> page
        self._entry: dict[int, tuple[int, Key]] = {}  # page -> (its entry id, its key)
        self._ids = itertools.count(1)
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages with no holder, oldest first
        self.lookups = self.hit_requests = self.hit_tokens = self.evictions = self.drops = 0

    # -- queries ------------------------------------------------------------------------------

    def __contains__(self, page: int) -> bool:
        return page in self._entry

    @property
    def idle_pages(self) -> int:
        return len(self._idle)

    def is_idle(self, page: int) -> bool:
        return page in self._idle

    def match(self, tokens: Sequence[int], max_pages: int) -> list[int]:
        """The cached pages of the longest chain `tokens` starts with, at most `max_pages`.

        >>> cache = PrefixCache(2)
        >>> cache.register([7, 8], [1, 2, 3, 4, 5], version=0)
        2
        >>> cache.match([1, 2, 3, 4, 9], 2), cache.match([1, 2, 9, 9], 2), cache.match([9, 2], 1)
        ([7, 8], [7], [])
        """
        s, parent, pages = self.page_size, 0, []
        for i in range(min(max_pages, len(tokens) // s)):
            page = self._index.get((parent, tuple(tokens[i * s : (i + 1) * s])))
            if page is None:
                break
            pages.append(page)
            parent = self._entry[page][0]
        return pages

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            version=self.version, cached_pages=len(self._entry), idle_pages=len(self._idle),
            lookups=self.lookups, hit_requests=self.hit_requests, hit_tokens=self.hit_tokens,
            evictions=self.evictions, drops=self.drops,
        )

    # -- changes (the pool calls these; it keeps who holds which page) -------------------------

    def counted(self, matched_pages: int) -> None:
        """Count one lookup of an admission and what it found."""
        self.lookups += 1
        self.hit_requests += matched_pages > 0
        self.hit_tokens += matched_pages * self.page_size

    def register(self, table: Sequence[int], tokens: Sequence[int], version: int) -> int:
        """Publish the full pages of `tokens` held by `table` (its first pages, in order), whose
        K/V `version` computed. A page already cached, or a key cached in another page (the same
        prefix prefilled twice in one batch), is left as it is, and the chain goes on from the
        cached page: a page's K/V depend only on the tokens up to it. Returns the pages added."""
        if version != self.version:
            raise ValueError(
                f"pages computed by weight version {version} offered to a prefix cache of version "
                f"{self.version}: the cache must be dropped at every swap (drop(version))"
            )
        s, parent, added = self.page_size, 0, 0
        for i in range(min(len(table), len(tokens) // s)):
            key = (parent, tuple(tokens[i * s : (i + 1) * s]))
            page = self._index.get(key)
            if page is None:
                page = table[i]
                if page in self._entry:  # cached under another key: cannot be (pages are immutable)
                    raise AssertionError(f"page {page} is cached under another prefix")
                self._index[key] = page
                self._entry[page] = (next(self._ids), key)
                added += 1
            parent = self._entry[page][0]
        return added

    def released(self, page: int) -> None:
        """`page` (cached) lost its last holder: it is idle, the most recently released."""
        self._idle[page] = None

    def reused(self, page: int) -> None:
        """An idle cached `page` has a holder again."""
        del self._idle[page]

    def evict_oldest(self) -> int:
        """Forget the least recently released idle page and return it (the pool reuses it)."""
        page, _ = self._idle.popitem(last=False)
        self._forget(page)
        self.evictions += 1
        return page

    def drop(self, version: int) -> list[int]:
        """Forget every entry (a swap to `version`); returns the idle pages, now free. Pages
        sequences hold stay theirs, findable no more."""
        idle = list(self._idle)
        self._index.clear()
        self._entry.clear()
        self._idle.clear()
        self.version = version
        self.drops += 1
        return idle

    def _forget(self, page: int) -> None:
        _, key = self._entry.pop(page)
        del self._index[key]

    def check(self, refs: Sequence[int]) -> None:
        """Raise AssertionError if the index or the idle set is inconsistent with `refs`."""
        assert len(self._index) == len(self._entry), "index and entries differ"
        for page, (_, key) in self._entry.items():
            assert self._index[key] == page, f"page {page}'s key points elsewhere"
            assert (refs[page] == 0) == (page in self._idle), f"page {page}: idle iff unheld"
        assert all(page in self._entry for page in self._idle), "an idle page is not cached"
