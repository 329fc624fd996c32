"""glibc malloc settings for a process whose JAX devices are the CPU.

On CPU, device buffers are host memory from malloc. With glibc's defaults every buffer larger
than its mmap threshold (at most 32 MiB) is a fresh mmap(): the pages fault in and are zeroed by
the kernel on first touch, on every use, and go back to the OS when freed. That costs twice:

- a weight sync stages a fresh gigabyte of buffers each time (bench/bench_sync.py, 1 GiB, 2
  workers: sync_weights 0.84 s -> 0.34-0.42 s with the settings below);
- a decode call's temporaries are allocated per call: at 128 rows of a 32000-token vocabulary
  an 8-step call of the 70M benchmark model faulted in ~1.1 GB (280,000 page faults, 0.6 s of
  kernel time) every call, 1.9-2.1 s against 1.3-1.4 s without the faults.

One arena that keeps freed memory (no mmap, no trimming) lets the next sync and the next call
reuse it warm. The cost: the process's RSS stays at its peak (serving + staged copy) instead of
dropping after a swap. The fleet starts its CPU workers with these as environment variables
(`rollout.coordinator.fleet.worker_env`; `FleetConfig.env_vars` overrides them). A process that runs an
`Engine` itself on CPU (the in-process benchmarks) calls `keep_freed_memory()` before
JAX initialises its backend (its first device query): it applies them with mallopt(). Later is
too late: JAX's threads by then allocate from arenas of their own, which mmap() buffers larger
than 64 MiB whatever the threshold (measured: 273,000 page faults per 8-step call of 128 rows
when applied after `jax.devices()`, none when applied before).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

CPU_MALLOC: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
}

# What keep_freed_memory sets for each variable above: (mallopt parameter, value), glibc's
# malloc.h numbering. mallopt takes a C int, so instead of the thresholds (past 2 GiB) it turns
# mmap() off for allocations (M_MMAP_MAX = 0) and trimming off (M_TRIM_THRESHOLD = -1, i.e. the
# largest unsigned value), which works the same on every glibc, whatever it allows a threshold to be.
_MALLOPT = {"MALLOC_ARENA_MAX": (-8, 1), "MALLOC_MMAP_THRESHOLD_": (-4, 0), "MALLOC_TRIM_THRESHOLD_": (-1, -1)}
_applied: dict[str, int] | None = None


def keep_freed_memory(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Apply CPU_MALLOC's effect to this process with mallopt(), once per process; variables
    named in `env` (default os.environ) are left as glibc read them at start-up. Returns the
    mallopt values applied, by variable (empty where the C library has no mallopt). Call it
    before JAX initialises its backend: it warns if that has happened."""
    global _applied
    if _applied is not None:
        return _applied
    env = os.environ if env is None else env
    _applied = {}
    if _jax_started():
        log.warning("keep_freed_memory() after JAX initialised its backend: JAX's threads keep their own "
                    "malloc arenas, so large buffers still come from fresh mmap()s; call it before the "
                    "first jax.devices() or set %s in the environment", ", ".join(CPU_MALLOC))
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("no mallopt() in this C library: CPU malloc settings not applied in-process")
        return _applied
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    for name, (param, value) in _MALLOPT.items():
        if name in env:
            continue
        if mallopt(param, value) == 1:
            _applied[name] = value
        else:
            log.warning("mallopt(%d, %d) for %s was refused: freed memory may be unmapped", param, value, name)
    return _applied


def _jax_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", None)
    return bool(started and started())
