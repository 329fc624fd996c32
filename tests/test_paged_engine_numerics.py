"""The paged engine's greedy continuations are transformers' `generate`, token for token, for
every variant of test_model_numerics (GQA ratios 1, 2, 4, head_dim != hidden/heads, Qwen2
biases) on 1 and 4 devices (the pool sharded by KV heads where they divide)."""

from __future__ import annotations

import jax
import pytest
from test_model_numerics import (  # noqa: F401  (checkpoints: a fixture used here)
    DEVICE_COUNTS,
    MAX_SEQ_LEN,
    PROMPTS,
    VARIANTS,
    Case,
    checkpoints,
    test_greedy_continuation_equals_transformers_generate,
)

from rollout.engine import EngineConfig
from rollout.engine.native.engine import Engine


@pytest.fixture(scope="module", params=[(v, n) for v in VARIANTS for n in DEVICE_COUNTS], ids=lambda c: f"{c[0]}-{c[1]}dev")
def case(request, checkpoints):  # noqa: F811
    name, n_devices = request.param
    path = checkpoints[name]
    config = EngineConfig(
        max_batch=len(PROMPTS), max_seq_len=MAX_SEQ_LEN, decode_steps=4, kv_layout="paged", page_size=4
    )
    with Engine(path, config, devices=jax.devices()[:n_devices]) as engine:
        yield Case(name, path, engine)
