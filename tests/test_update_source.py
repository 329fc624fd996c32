"""rollout.coordinator.sync.update_source: the one place that tells a checkpoint update (each worker
loads it) from a pytree (packed and sent by the coordinator) and a LoRA adapter (its factors sent)."""

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


def test_a_peft_adapter_directory_is_a_lora_update_and_a_checkpoint_directory_is_not(tmp_path):
    adapter, checkpoint = tmp_path / "adapter", tmp_path / "checkpoint"
    adapter.mkdir()
    checkpoint.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (checkpoint / "config.json").write_text("{}")
    assert update_source(adapter) == "lora"
    assert update_source(str(adapter)) == "lora"
    assert update_source(checkpoint) == "checkpoint"
