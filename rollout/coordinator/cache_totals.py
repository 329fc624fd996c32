"""The fleet's prefix cache at a glance: each worker's counters (its engine's status, "kv"
-> "prefix_cache", rollout.engine.native.kv.paged.prefix_cache) summed over the workers that
answered. No jax, no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SUMMED = ("cached_pages", "idle_pages", "lookups", "hit_requests", "hit_tokens", "evictions")


def prefix_cache_totals(workers: Iterable[Mapping[str, Any]]) -> dict[str, int] | None:
    """The sum of every reporting worker's prefix cache counters, with "workers" (how many
    reported one); None if none has a prefix cache (contiguous layout, sglang-jax, cache off).

    >>> w = {"kv": {"prefix_cache": {"cached_pages": 3, "idle_pages": 1, "lookups": 4, "hit_requests": 2,
    ...                              "hit_tokens": 64, "evictions": 0}}}
    >>> prefix_cache_totals([w, w, {"error": "no status reply"}])["hit_tokens"]
    128
    >>> prefix_cache_totals([{"kv": {"layout": "contiguous"}}]) is None
    True
    """
    caches = [w["kv"]["prefix_cache"] for w in workers if (w.get("kv") or {}).get("prefix_cache")]
    if not caches:
        return None
    return {"workers": len(caches), **{key: sum(int(c.get(key, 0)) for c in caches) for key in SUMMED}}
