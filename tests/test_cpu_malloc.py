"""In-process malloc settings for CPU engines (rollout.worker.cpu_malloc): a freed large buffer is
reused warm instead of faulting in fresh pages, and settings from the environment are kept."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from rollout.worker.cpu_malloc import CPU_MALLOC

# Allocates, touches and frees 64 MiB twice; prints the page faults of the second round.
PROBE = """
import ctypes, json, resource, sys
from rollout.worker.cpu_malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "apply" else {}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def round_trip():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "applied": applied}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc")
def test_a_freed_large_buffer_is_reused_without_page_faults_once_applied():
    assert probe("default")["faults"] > 10_000  # 64 MiB of fresh 4 KiB pages: glibc mmap()s it anew
    applied = probe("apply")
    assert set(applied["applied"]) == set(CPU_MALLOC)
    assert applied["faults"] < 1_000


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc")
def test_settings_from_the_environment_are_left_as_glibc_read_them():
    applied = probe("apply", MALLOC_ARENA_MAX="4")["applied"]
    assert "MALLOC_ARENA_MAX" not in applied
    assert set(applied) == set(CPU_MALLOC) - {"MALLOC_ARENA_MAX"}
