"""What the host the benchmark runs on can do at most, measured in the benchmark's own run.

Three probes, each a few seconds at most (and a fourth on an accelerator):

- `cpu_model()`: the CPU's name, cores and the vector/matrix extensions XLA and torch can use
  (AVX-512, AMX), read from /proc/cpuinfo.
- `memory_bandwidth()`: bytes/s a jitted JAX float32 sum reads from an array far larger than
  the last-level cache (best of a few): the rate a decode step at batch 1 streams its weights at.
- `matmul_peak(shapes)`: float32 FLOP/s of `[m x k] @ [k x n]` in JAX and, where installed,
  torch (what transformers runs on), at the model's decode shapes (best of a few timed loops).
- on an accelerator (`--platform gpu|tpu`, named by `devices.accelerator_name()`): the bandwidth
  of its memory (HBM: a sum over several GiB on the device) and the matmul rates on the device,
  both in the benchmark's dtype (`dtype=`, `torch_device=`).

The host is shared and its load drifts, so these are figures of this run, taken beside the
engine's: rollout.bench.roofline turns them into the fractions the benchmarks print. torch is
imported only inside matmul_peak and only when installed (the product never needs it).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rollout.bench.devices import synchronize

# Extensions that decide a CPU's float32/bfloat16 matmul rate, in the order they are printed.
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str  # /proc/cpuinfo "model name" ("unknown" off Linux)
    cores: int  # os.cpu_count(): logical CPUs this process may see
    flags: tuple[str, ...]  # the NOTABLE_FLAGS this CPU has, in NOTABLE_FLAGS order

    def describe(self) -> str:
        """One line, e.g. 'AMD EPYC, 2 cores, avx2 fma avx512f avx512_bf16'."""
        return f"{self.model}, {self.cores} cores, {' '.join(self.flags) or 'no AVX2/AVX-512/AMX'}"


@dataclass(frozen=True)
class MatmulRate:
    library: str  # "jax" or "torch"
    m: int  # rows of the left operand (the decode batch)
    k: int  # the contracted dimension (hidden size)
    n: int  # columns of the right operand (intermediate size)
    flops_per_s: float  # 2*m*k*n / the best time of one matmul

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_cpuinfo(text: str, cores: int) -> CpuInfo:
    """The CPU named by the text of /proc/cpuinfo (its first processor block).

    >>> parse_cpuinfo("processor : 0\\nmodel name\\t: Intel Xeon\\nflags : fpu avx2 avx512f amx_bf16\\n", 2)
    CpuInfo(model='Intel Xeon', cores=2, flags=('avx2', 'avx512f', 'amx_bf16'))
    >>> parse_cpuinfo("", 1).model
    'unknown'
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    present = set(fields.get("flags", "").split())
    return CpuInfo(
        model=fields.get("model name", "unknown") or "unknown",
        cores=cores,
        flags=tuple(f for f in NOTABLE_FLAGS if f in present),
    )


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This host's CPU: name, logical cores, and the notable extensions among its flags."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, os.cpu_count() or 1)


# Pause before each probe: XLA's and torch's worker threads spin a while after their last work,
# and on a host of few cores a library timed meanwhile runs many times slower (seen: 300x).
SETTLE_SECONDS = 0.3


def best_seconds(fn: Callable[[], object], repeats: int, calls: int = 1) -> float:
    """The best of `repeats` timings of `calls` back-to-back calls of `fn`, per call. `fn` must
    block until its work is done (the last call at least, for asynchronously dispatched work)."""
    if repeats < 1 or calls < 1:
        raise ValueError(f"repeats and calls must be >= 1, got repeats={repeats}, calls={calls}")
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


class BandwidthProbe:
    """A jitted sum over `nbytes` of `dtype` values on JAX's default device, compiled once and
    kept, so a benchmark can probe the memory bandwidth between its timed runs (a shared host's
    bandwidth drifts by tens of percent within minutes). Keep `nbytes` many times the last-level
    cache (the default, 512 MiB, is 16x a 32 MiB L3; an H100's L2 is 50 MB), or this measures
    the cache."""

    def __init__(self, nbytes: int = 512 << 20, dtype: str = "float32", calls: int = 1):
        import jax
        import jax.numpy as jnp

        itemsize = jnp.dtype(dtype).itemsize
        if nbytes < itemsize:
            raise ValueError(f"nbytes must hold at least one {dtype} ({itemsize} bytes), got {nbytes}")
        self.nbytes = (nbytes // itemsize) * itemsize
        self.calls = calls
        self._x = jnp.ones((nbytes // itemsize,), dtype)  # (nbytes / itemsize,)
        self._total = jax.jit(functools.partial(jnp.sum, dtype=jnp.float32))  # accumulates in float32 (as XLA does)
        self._total(self._x).block_until_ready()  # compile

    def __call__(self, repeats: int = 5) -> float:
        """Bytes/s: the best of `repeats` timings of `calls` sums dispatched back to back
        (several calls hide an accelerator's dispatch latency)."""
        time.sleep(SETTLE_SECONDS)

        def run() -> object:
            out = self._total(self._x)
            for _ in range(self.calls - 1):
                out = self._total(self._x)
            return out.block_until_ready()

        return self.nbytes / (best_seconds(run, repeats) / self.calls)


def memory_bandwidth(nbytes: int = 512 << 20, repeats: int = 5, dtype: str = "float32", calls: int = 1) -> float:
    """Bytes/s a jitted sum over `nbytes` of `dtype` values on JAX's default device reads, best
    of `repeats` timings of `calls` sums (see BandwidthProbe), its memory freed afterwards."""
    return BandwidthProbe(nbytes, dtype, calls)(repeats)


def calls_for(seconds_per_call: float, target_seconds: float) -> int:
    """How many calls of a timed loop fill `target_seconds` (at least 1), so that short matmuls
    are timed over many calls and the timer's resolution does not matter.

    >>> calls_for(0.001, 0.05)
    50
    >>> calls_for(1.0, 0.05)
    1
    """
    return max(1, round(target_seconds / max(seconds_per_call, 1e-9)))


def jax_matmul_rate(
    m: int, k: int, n: int, repeats: int, target_seconds: float, dtype: str = "float32", torch_device: str = "cpu"
) -> MatmulRate:
    """`[m x k] @ [k x n]` of `dtype` in jitted JAX on the default device; the calls are
    dispatched back to back (as a decode step's are queued) and the last one is waited for."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), dtype)  # (batch, hidden)
    b = jax.random.normal(kb, (k, n), dtype)  # (hidden, inter)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()  # compile

    def many(calls: int) -> Callable[[], object]:
        def run() -> object:
            out = dot(a, b)
            for _ in range(calls - 1):
                out = dot(a, b)
            return out.block_until_ready()

        return run

    calls = calls_for(best_seconds(many(1), 2), target_seconds)
    seconds = best_seconds(many(calls), repeats) / calls
    return MatmulRate("jax", m, k, n, 2.0 * m * k * n / seconds)


def torch_matmul_rate(
    m: int, k: int, n: int, repeats: int, target_seconds: float, dtype: str = "float32", torch_device: str = "cpu"
) -> MatmulRate:
    """`[m x k] @ [k x n]` of `dtype` in torch on `torch_device`: the CPU with all cores (as the
    benchmarks set it), or "cuda" (each timed loop ends in torch.cuda.synchronize())."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(0)
    kind = getattr(torch, dtype)
    a = torch.randn(m, k, generator=gen, dtype=torch.float32).to(torch_device, kind)  # (batch, hidden)
    b = torch.randn(k, n, generator=gen, dtype=torch.float32).to(torch_device, kind)  # (hidden, inter)
    out = torch.empty(m, n, dtype=kind, device=torch_device)
    with torch.no_grad():
        torch.mm(a, b, out=out)  # warm-up

        def many(calls: int) -> Callable[[], object]:
            def run() -> object:
                for _ in range(calls):
                    torch.mm(a, b, out=out)
                synchronize(torch, torch_device)
                return out

            return run

        calls = calls_for(best_seconds(many(1), 2), target_seconds)
        seconds = best_seconds(many(calls), repeats) / calls
    return MatmulRate("torch", m, k, n, 2.0 * m * k * n / seconds)


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def matmul_peak(
    shapes: Sequence[tuple[int, int, int]], repeats: int = 5, target_seconds: float = 0.1,
    dtype: str = "float32", torch_device: str = "cpu",
) -> list[MatmulRate]:
    """FLOP/s of each `(m, k, n)` matmul of `dtype` in JAX (default device), and in torch (on
    `torch_device`) where it is installed.

    Each rate is the best of `repeats` timed loops of about `target_seconds`; the loop length
    comes from two single calls timed first, so tiny shapes are timed over many calls.
    """
    libraries: list[Callable[..., MatmulRate]] = [jax_matmul_rate]
    if torch_installed():
        libraries.append(torch_matmul_rate)
    for m, k, n in shapes:
        if min(m, k, n) < 1:
            raise ValueError(f"matmul shapes are (m, k, n) of positive sizes, got {(m, k, n)}")
    rates = []
    for m, k, n in shapes:
        for rate in libraries:
            time.sleep(SETTLE_SECONDS)
            rates.append(rate(m, k, n, repeats, target_seconds, dtype, torch_device))
    return rates

