"""PartsMaker: a bucket as the list of its leaves' bytes, checked and hashed without packing it.

The coordinator of a sync puts each bucket into the object store as its parts (one 1-D uint8
array per leaf, in layout order; see rollout.weights.buckets): `ray.put` of that list copies
every leaf once, straight from the caller's array into the object store, so nothing is packed
into a host buffer first (a pack copy saved per byte, and no bucket-sized buffers kept). A leaf
whose dtype differs from the slot's, or that is not C-contiguous (e.g. a transposed HF weight),
is cast into a fresh array first: that copy is the only one.

Before a bucket is put, its parts are read once: each 4 MiB window of the packed bucket is
counted finite (floating leaves; NaN or Inf raises NonFiniteWeightsError naming the first bad
leaf and its count) and hashed, spread over `threads` threads (numpy and xxhash release the
GIL). The checksum is the one of the packed bucket (`checksum(pack(...).buffers[i])`), so a
reader may hold either form.

    with PartsMaker(flat, layout, checksum_algo="xxh3_64", threads=2) as maker:
        parts, checksum = maker.bucket(0)     # raises NonFiniteWeightsError
        ref = ray.put(parts)                  # one object: every leaf copied once

The parts view the caller's arrays: they must not change until the bucket is put (a change
after hashing would be refused by every reader's checksum, never served).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

import numpy as np

from rollout.weights.buckets import (
    CHECKSUMS,
    DEFAULT_CHECKSUM,
    WINDOW,
    BucketLayout,
    LeafSlot,
    _cast_into,
    _combine_windows,
    numpy_dtype,
    parts_checksum,
    segments_digest,
    window_segments,
)
from rollout.weights.finite import count_non_finite, is_floating, non_finite_error


def leaf_part(array: Any, slot: LeafSlot) -> np.ndarray:
    """The bytes of `array` as `slot` holds them (its dtype, C order) as a 1-D uint8 array: a
    view when `array` is already so, else a cast copy."""
    source = np.asarray(array)
    if tuple(source.shape) != slot.shape:
        raise ValueError(f"{slot.path}: expected shape {slot.shape}, got {source.shape}")
    dtype = numpy_dtype(slot.dtype)
    if source.dtype != dtype or not source.flags.c_contiguous:
        cast = np.empty(slot.shape, dtype)
        _cast_into(cast, source)  # an overflow to Inf is counted with the rest
        source = cast
    return source.reshape(-1).view(np.uint8)


class PartsMaker:
    """Makes the parts of each bucket of `layout` from `flat` (host arrays), counting NaN/Inf
    and computing the bucket's checksum on the way (see the module docstring)."""

    def __init__(
        self,
        flat: Mapping[str, Any],
        layout: BucketLayout,
        *,
        checksum_algo: str = DEFAULT_CHECKSUM,
        threads: int = 2,
    ):
        if checksum_algo not in CHECKSUMS:
            raise ValueError(f"checksum_algo={checksum_algo!r}: expected one of {CHECKSUMS}")
        for slot in layout.slots:
            shape = getattr(flat[slot.path], "shape", None)
            if tuple(shape or ()) != slot.shape:
                raise ValueError(f"{slot.path}: expected shape {slot.shape}, got {shape}")
        self.flat, self.layout, self.checksum_algo = flat, layout, checksum_algo
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="rollout-parts")

    def bucket(self, index: int) -> tuple[list[np.ndarray], int]:
        """Bucket `index` as parts, and its checksum. Raises NonFiniteWeightsError."""
        slots = self.layout.leaves_of(index)
        parts = list(self._pool.map(lambda slot: leaf_part(self.flat[slot.path], slot), slots))
        nbytes = self.layout.bucket_nbytes[index]
        windows = list(self._pool.map(
            lambda lo: self._window(slots, parts, lo, min(lo + WINDOW, nbytes)), range(0, max(nbytes, 1), WINDOW)
        ))
        bad: dict[str, int] = {}
        for _, window_bad in windows:
            for path, count in window_bad:
                bad[path] = bad.get(path, 0) + count
        if bad:
            path = next(slot.path for slot in slots if slot.path in bad)  # the first in spec order
            raise non_finite_error(path, bad[path])
        if self.checksum_algo == "xxh3_64":
            return parts, _combine_windows([digest for digest, _ in windows], nbytes)
        return parts, parts_checksum(self.layout, index, parts, self.checksum_algo)

    def _window(
        self, slots: list[LeafSlot], parts: list[np.ndarray], lo: int, hi: int
    ) -> tuple[int, list[tuple[str, int]]]:
        """Count and hash bytes [lo, hi) of the packed bucket: (xxh3 digest or 0, [(path, non-finite)])."""
        bad: list[tuple[str, int]] = []
        for slot, part in zip(slots, parts):
            begin, end = max(lo, slot.offset), min(hi, slot.offset + slot.nbytes)
            dtype = numpy_dtype(slot.dtype)
            if begin >= end or not is_floating(dtype):
                continue
            # offsets are ALIGN-aligned and windows WINDOW-aligned: both multiples of the itemsize
            count = count_non_finite(part[begin - slot.offset : end - slot.offset].view(dtype))
            if count:
                bad.append((slot.path, count))
        if self.checksum_algo != "xxh3_64":
            return 0, bad
        return segments_digest(window_segments(slots, parts, lo, hi)), bad

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
