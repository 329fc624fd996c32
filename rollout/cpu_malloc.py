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
(`rollout.fleet.worker_env`; `FleetConfig.env_vars` overrides them). A process that runs an
`Engine` itself on CPU (the in-process benchmarks) calls `keep_freed_memory()` before
JAX initialises its backend (its first device query): it applies them with mallopt(). Later is
too late: JAX's threads by then allocate from arenas of their own, which mmap() buffers larger
than 64 MiB whatever the threshold (measured: 273,000 page faults per 8-step call of 128 rows
when applied after `jax.devices()`, none when applied before).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

CPU_MALLOC: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
}

# mallopt() parameters (glibc's malloc.h) of each environment variable above.
_MALLOPT_PARAM = {"MALLOC_ARENA_MAX": -8, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}
_INT_MAX = 2**31 - 1  # mallopt takes a C int
_applied: dict[str, int] | None = None


def keep_freed_memory(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Apply CPU_MALLOC to this process with mallopt(), once; settings named in `env` (default
    os.environ) are left as glibc read them at start-up. Returns what was applied (empty where
    the C library is not glibc)."""
    global _applied
    if _applied is not None:
        return _applied
    env = os.environ if env is None else env
    _applied = {}
    libc_name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt if libc_name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("no glibc mallopt(): CPU malloc settings not applied in-process")
        return _applied
    for name, value in CPU_MALLOC.items():
        if name in env:
            continue
        setting = min(int(value), _INT_MAX)
        if mallopt(ctypes.c_int(_MALLOPT_PARAM[name]), ctypes.c_int(setting)) == 1:
            _applied[name] = setting
        else:
            log.info("mallopt refused %s=%d", name, setting)
    return _applied
