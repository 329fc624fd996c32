"""The sglang-jax backend tensor parallel over 2 (simulated CPU) devices: its leaves are sharded
as sglang-jax shards them, a sync places each new leaf on its serving leaf's sharding, and the
greedy tokens stay the transformers reference's."""

from __future__ import annotations

import pytest

from rollout.engine import EngineConfig
from tests.sglang.helpers import hf_flat, sync, tokens

pytestmark = [pytest.mark.sglang, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_two_device_engine_syncs_onto_its_shardings_and_matches_transformers(refs, ckpt_a, ckpt_b):
    import jax

    from rollout.engine.sglang import create_engine

    engine = create_engine(ckpt_a, EngineConfig(max_batch=2, max_seq_len=128, load_format="dummy"), jax.devices()[:2])
    try:
        layout = engine._state.shapes()
        assert {len(sharding.device_set) for _, _, sharding in layout} == {2}  # its devices, not all 4
        sync(engine, ckpt_a)
        assert tokens(engine, refs["prompts"], refs["max_new_tokens"]) == refs["greedy"]["a"]
        sync(engine, hf_flat(ckpt_b))
        assert tokens(engine, refs["prompts"], refs["max_new_tokens"]) == refs["greedy"]["b"]
        assert engine._state.shapes() == layout
    finally:
        engine.shutdown()
