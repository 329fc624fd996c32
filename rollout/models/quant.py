"""Weight-only quantized kernels: int8 (or fp8 e4m3) values with one scale per output channel.

A `QuantizedKernel` stands where a Linear's (in, out) kernel stood: the engine's flat parameter
dict holds it under the kernel's path (it is a pytree of two arrays, so the jitted forwards take
it as an argument like any leaf, and a sync swaps it without recompiling), and `matmul` is the
one place that multiplies by one:

    y = (x @ q.astype(x.dtype)) * scale          # scale (out,) after the dot, in x's dtype

Per-output-channel scales commute with the dot, so the dequantized (in, out) matrix is never
built. The values are stored in column chunks, q (chunks, in, cols): on XLA:CPU a convert fused
into a dot is not fused (XLA converts the whole int8 matrix to a float temporary, then calls the
float dot: on the 75M bench model int8 decoded at ~0.5x float32's tokens/s at batch 1), while
a scan over column chunks converts one cache-sized block at a time and hands it to the fast
float dot (`CPU_CHUNK_BYTES`; 256 KiB blocks: ~50 tokens/s against float32's 45-50 on a loaded
2-core host; 1 MiB blocks and more were slower). On TPU and
GPU, where XLA fuses the convert into the dot, there is one chunk (`chunk_cols`).

Why not qwix (google/qwix): its `QArray` keeps the quantized value in the original (in, out)
shape, which is what XLA:CPU cannot make fast (above), and its model-level PTQ rewrites a
module's calls by interception at trace time into a parameter tree of its own, while this
engine keeps one flat `{path: array}` dict, validated against the full-precision spec, placed
leaf by leaf with per-path shardings and swapped atomically at each sync. The arithmetic is the
same as qwix's channelwise absmax (`qwix.quantize(w, jnp.int8, channelwise_axes=[1])`), which
the tests compare against a numpy reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

QDTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}  # the largest magnitude of each stored type
CPU_CHUNK_BYTES = 256 << 10  # a chunk's float32 temporary: stays in a core's L2 cache (128-256 KiB measured best)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """An (in, out) kernel as quantized values and per-output-channel scales."""

    q: Array  # (chunks, in, cols) int8 or float8_e4m3fn; chunks * cols == out
    scale: Array  # (out,) in the engine's dtype

    @property
    def shape(self) -> tuple[int, int]:
        """The (in, out) shape of the kernel it stands for."""
        chunks, d_in, cols = self.q.shape
        return d_in, chunks * cols

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes) + int(self.scale.nbytes)


def chunk_cols(d_in: int, d_out: int, platform: str) -> int:
    """Output columns per chunk: all of them off CPU; on CPU the widest divisor of `d_out` whose
    float32 block (d_in x cols) fits CPU_CHUNK_BYTES, at least 64 columns.

    >>> chunk_cols(768, 32000, "cpu"), chunk_cols(768, 768, "cpu"), chunk_cols(768, 32000, "tpu")
    (80, 64, 32000)
    """
    if platform != "cpu":
        return d_out
    want = max(64, CPU_CHUNK_BYTES // (4 * d_in))
    if want >= d_out:
        return d_out
    for cols in range(want, 0, -1):
        if d_out % cols == 0:
            return cols
    return d_out  # unreachable: 1 divides everything


def quantize(w: Array, kind: str, cols: int, scale_dtype: Any) -> QuantizedKernel:
    """(in, out) float kernel -> QuantizedKernel, absmax per output column (symmetric).

    scale = max|w[:, j]| / QMAX (1 for an all-zero column), q = round(w / scale) (int8; fp8
    rounds to nearest e4m3). Runs under jit on the kernel's devices.
    """
    d_in, d_out = w.shape
    wf = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(wf), axis=0)  # (out,)
    scale = jnp.where(absmax > 0, absmax / QMAX[kind], 1.0)
    scaled = wf / scale
    q = jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8) if kind == "int8" else scaled.astype(QDTYPES[kind])
    q = q.reshape(d_in, d_out // cols, cols).transpose(1, 0, 2)  # (chunks, in, cols)
    return QuantizedKernel(q, scale.astype(scale_dtype))


def dequantize(k: QuantizedKernel) -> Array:
    """The (in, out) kernel `k` stands for, in its scale's dtype (for checks and references)."""
    chunks, d_in, cols = k.q.shape
    values = k.q.transpose(1, 0, 2).reshape(d_in, chunks * cols).astype(jnp.float32)
    return (values * k.scale.astype(jnp.float32)).astype(k.scale.dtype)


def matmul(x: Array, kernel: Array | QuantizedKernel) -> Array:
    """x (..., in) @ kernel (in, out), quantized or not. Quantized: the dot of x with the stored
    values converted to x's dtype, chunk by chunk, then times the scales (see the module doc)."""
    if not isinstance(kernel, QuantizedKernel):
        return x @ kernel
    chunks, d_in, cols = kernel.q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    if chunks == 1:
        y = x2 @ kernel.q[0].astype(x.dtype)
    else:
        _, ys = jax.lax.scan(lambda c, qb: (c, x2 @ qb.astype(x.dtype)), None, kernel.q)  # (chunks, rows, cols)
        y = ys.transpose(1, 0, 2).reshape(x2.shape[0], chunks * cols)
    return (y * kernel.scale.astype(y.dtype)).reshape(*lead, chunks * cols)

