"""Every engine-level test of test_engine_generation, on the paged engine.

The test functions are test_engine_generation's own (collected here with this module's
`engine` fixture): continuous batching, seeded sampling, logprobs, stops, text, bad requests
and cancel keep their meaning with kv_layout="paged". The pool is smaller than the contiguous
layout's memory (page_size 8, 64 pages = 512 positions for 8 slots of up to 128), so long
requests here also grow, share and free pages under pressure.
"""

from __future__ import annotations

import inspect

import pytest
import test_engine_generation as contiguous

from rollout.engine import EngineConfig
from rollout.engine.native.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    config = EngineConfig(max_batch=8, max_seq_len=128, decode_steps=4, kv_layout="paged", page_size=8, kv_pages=64)
    with Engine(tiny_qwen3, config) as eng:
        yield eng


for _name, _test in vars(contiguous).items():
    if _name.startswith("test_") and "engine" in inspect.signature(_test).parameters:
        globals()[_name] = _test
