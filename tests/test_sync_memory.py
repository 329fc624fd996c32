"""The coordinator's pack memory: none for leaves already in the fleet's dtype and C order (a
sync puts views of them; the put copies each once), a fresh array only for a leaf it must cast."""

from __future__ import annotations

import numpy as np

from rollout.sync import Fleet, WeightSync
from rollout.weights.parts import PartsMaker
from rollout.weights.spec import spec_of_leaves

SPEC = spec_of_leaves([(f"layers.{i}.w", (256,), "float32") for i in range(7)])  # 1 KiB each


def _sync() -> WeightSync:
    fleet = Fleet(handles=[], registry=None, spec=SPEC, live_workers=list, worker_down=lambda i, err: None)
    return WeightSync(fleet, bucket_bytes=2048, timeout_s=1.0)


def test_a_sync_copies_only_the_leaves_it_must_cast_before_the_put():
    sync = _sync()
    flat = {leaf.path: np.ones(leaf.shape, np.float32) for leaf in SPEC.leaves}
    flat["layers.3.w"] = np.ones(256, np.float64)  # a float64 trainer leaf: cast to float32
    copied = 0
    with PartsMaker(flat, sync.layout) as maker:
        for index in range(len(sync.layout.bucket_nbytes)):
            parts, _ = maker.bucket(index)
            for slot, part in zip(sync.layout.leaves_of(index), parts):
                if not np.shares_memory(part, flat[slot.path]):
                    copied += part.nbytes
    assert len(sync.layout.bucket_nbytes) == 4
    assert copied == 1024  # the cast leaf alone, not a bucket, not the model
