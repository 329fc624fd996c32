"""The coordinator's pack memory: two buckets, not a copy of the model."""

from __future__ import annotations

import numpy as np

from rollout.coordinator.fleet_view import FleetView
from rollout.coordinator.routing import Router
from rollout.coordinator.sync import WeightSync
from rollout.weights.spec import spec_of_leaves

SPEC = spec_of_leaves([(f"layers.{i}.w", (256,), "float32") for i in range(7)])  # 1 KiB each


def _sync() -> WeightSync:
    fleet = FleetView(handles=(), router=Router(0), registry=None, spec=SPEC, max_retries=0)
    return WeightSync(fleet, bucket_bytes=2048, timeout_s=1.0)


def _owners(buffers: list[np.ndarray]) -> set[int]:
    return {id(b.base if b.base is not None else b) for b in buffers}


def test_buckets_take_turns_in_two_buffers_of_the_largest_bucket():
    sync = _sync()
    buffers = sync.pack_buffers()
    assert [b.nbytes for b in buffers] == list(sync.layout.bucket_nbytes)
    assert len(buffers) == 4 and len(_owners(buffers)) == 2
    assert not np.shares_memory(buffers[0], buffers[1])  # packed while the other is put
    assert np.shares_memory(buffers[0], buffers[2])
    assert sync.pack_buffers() is buffers  # kept for the next sync

