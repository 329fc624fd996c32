"""Finiteness of parameter values: counted in cache-sized chunks, refused with one error type.

Used where an update is made (the coordinator's packer counts each stretch of a bucket right
after copying it, while it is still in cache) and where a worker stages values that no packer
checked (checkpoints, direct `engine.stage` calls). No jax here: the coordinator imports this.
"""

from __future__ import annotations

import numpy as np


class NonFiniteWeightsError(ValueError):
    """A parameter update holds NaN or Inf."""


def non_finite_error(path: str, count: int) -> NonFiniteWeightsError:
    return NonFiniteWeightsError(
        f"{path}: {count} non-finite value(s) (NaN or Inf); refusing the update. Check the "
        "trainer's loss and gradients for this step."
    )


def is_floating(dtype: np.dtype) -> bool:
    """Whether values of `dtype` can be NaN or Inf (numpy floats and ml_dtypes' bfloat16)."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


_FINITE_CHUNK = 1 << 18  # elements checked at a time: the mask stays in cache, no leaf-sized temporary
# 16-bit floats: NaN/Inf are the values whose exponent bits are all ones. numpy's isfinite on
# ml_dtypes' bfloat16 goes through a per-element cast (~2.7 GB/s here); masking the bits of the
# uint16 view runs at memory speed (6-8x faster, measured on a 128 MiB leaf).
_EXPONENT_BITS = {"bfloat16": 0x7F80, "float16": 0x7C00}


def count_non_finite(array: np.ndarray) -> int:
    """How many NaN/Inf values `array` holds, in one cache-friendly pass.

    `np.isfinite(a).all()` writes and rereads a boolean array as large as the leaf; checking
    chunk by chunk into one small mask is ~30% faster on a 1 GiB update.
    """
    flat = array.reshape(-1)
    exponent = _EXPONENT_BITS.get(flat.dtype.name)
    if exponent is not None:
        flat = flat.view(np.uint16)
        bits = np.empty(min(flat.size, _FINITE_CHUNK), np.uint16)
    mask = np.empty(min(flat.size, _FINITE_CHUNK), dtype=bool)
    bad = 0
    for lo in range(0, flat.size, _FINITE_CHUNK):
        chunk = flat[lo : lo + _FINITE_CHUNK]
        if exponent is None:
            broken = np.logical_not(np.isfinite(chunk, out=mask[: chunk.size]), out=mask[: chunk.size])
        else:
            np.bitwise_and(chunk, exponent, out=bits[: chunk.size])
            broken = np.equal(bits[: chunk.size], exponent, out=mask[: chunk.size])
        if broken.any():
            bad += int(np.count_nonzero(broken))
    return bad
