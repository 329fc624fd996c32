"""How many executables a jitted function has compiled: read from jax's private API, in one place."""

from __future__ import annotations

from typing import Any


def compiled_executables(fn: Any) -> int:
    """Executables `fn` (a `jax.jit` result) has compiled so far.

    jax exposes this only as the private `_cache_size()` of its jit wrapper (not in its type
    stubs); every caller goes through here so a jax upgrade that moves it breaks one line.
    """
    jitted: Any = fn  # the stubs' JitWrapped has no _cache_size: read it untyped, on purpose
    return int(jitted._cache_size())
