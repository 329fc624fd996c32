"""rollout.coordinator.sync.update_source: the one place that tells a checkpoint update (each worker
loads it) from a pytree (packed and sent by the coordinator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rollout.coordinator.sync import update_source


def test_a_directory_or_repo_id_is_a_checkpoint_update(tmp_path):
    assert update_source(str(tmp_path)) == "checkpoint"
    assert update_source(Path(tmp_path)) == "checkpoint"
    assert update_source("Qwen/Qwen3-0.6B") == "checkpoint"


def test_parameters_in_memory_are_a_pytree_update():
    assert update_source({"layers.0.w": np.zeros(4, np.float32)}) == "pytree"
    assert update_source({"model": {"embed": np.zeros(4, np.float32)}}) == "pytree"
