"""BucketInbox: the buckets of one update as they arrive, readable as a parameter tree at once.

The coordinator puts bucket k into the object store while workers already stage the leaves of
buckets < k: a worker hands `inbox.tree()` to `engine.stage` right away; each leaf of that tree
has its shape and dtype from the manifest, and its data is read (`np.asarray`) only once its
bucket has arrived and its checksum was verified. The engine reads leaves in spec order, which
is bucket order, so placement on the devices overlaps the transfer of later buckets.

Every bucket is verified before any of its bytes is read. A failed bucket, an abort or a
timeout makes every pending read raise, so the engine's stage fails and nothing is staged.

    inbox = BucketInbox(manifest, timeout_s=600)
    # receiving side, per bucket:   inbox.deliver(index, buffer)  (after verify_bucket)
    # staging thread:               engine.stage(manifest.version, inbox.tree())
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from rollout.weights.buckets import LeafSlot, Manifest, leaf_view, numpy_dtype


class BucketInbox:
    def __init__(self, manifest: Manifest, timeout_s: float):
        self.manifest = manifest
        self.timeout_s = timeout_s
        self._buffers: list[np.ndarray | None] = [None] * len(manifest.layout.bucket_nbytes)
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self.wait_s = 0.0  # time readers spent waiting for buckets

    def deliver(self, index: int, buffer: np.ndarray) -> None:
        """Hand over verified bucket `index`."""
        with self._cond:
            self._buffers[index] = buffer
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """Make every pending and future read raise `error` (the first failure wins)."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def bucket(self, index: int) -> np.ndarray:
        """Bucket `index`, waiting for it; raises the inbox's failure or TimeoutError."""
        start = time.perf_counter()
        with self._cond:
            arrived = self._cond.wait_for(
                lambda: self._error is not None or self._buffers[index] is not None, self.timeout_s
            )
            self.wait_s += time.perf_counter() - start
            if self._error is not None:
                raise self._error
            if not arrived:
                raise TimeoutError(
                    f"bucket {index} of version {self.manifest.version} did not arrive within "
                    f"{self.timeout_s:g}s; the coordinator stopped sending (see its log)"
                )
            buffer = self._buffers[index]
            assert buffer is not None  # it arrived (checked above, under the lock)
            return buffer

    def tree(self) -> dict[str, PendingLeaf]:
        """{path: leaf} in spec order; each leaf's data waits for its bucket."""
        return {slot.path: PendingLeaf(self, slot) for slot in self.manifest.layout.slots}

    def release(self) -> None:
        """Drop the buckets (their object-store pins) once staging is over."""
        with self._cond:
            self._buffers = [None] * len(self._buffers)


class PendingLeaf:
    """An array-like whose shape and dtype are known now and whose data comes with its bucket."""

    __slots__ = ("_inbox", "_slot", "dtype", "shape")

    def __init__(self, inbox: BucketInbox, slot: LeafSlot):
        self._inbox = inbox
        self._slot = slot
        self.shape = slot.shape
        self.dtype = numpy_dtype(slot.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        view = leaf_view(self._inbox.bucket(self._slot.bucket), self._slot)
        if dtype is not None and np.dtype(dtype) != view.dtype:
            return view.astype(dtype)
        return view.copy() if copy else view

    def __repr__(self) -> str:
        return f"PendingLeaf({self._slot.path!r}, shape={self.shape}, dtype={self.dtype.name}, bucket={self._slot.bucket})"
