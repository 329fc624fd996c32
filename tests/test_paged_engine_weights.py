"""Every engine-level test of test_engine_weights, on the paged engine: swap policies (drain,
recompute, continue) keep their meaning with pages, and a swap compiles nothing (the compile
counter test), with kv_layout="paged".

The test functions are test_engine_weights' own, collected here with this module's `engine`.
"""

from __future__ import annotations

import inspect

import pytest
import test_engine_weights as contiguous

from rollout.engine import EngineConfig
from rollout.engine.native.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    config = EngineConfig(max_batch=4, max_seq_len=256, decode_steps=4, kv_layout="paged", page_size=16)
    with Engine(tiny_qwen3, config) as eng:
        yield eng


for _name, _test in vars(contiguous).items():
    if _name.startswith("test_") and "engine" in inspect.signature(_test).parameters:
        globals()[_name] = _test
