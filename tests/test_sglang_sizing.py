"""The sglang-jax backend's host-memory estimate refuses a fleet that would be killed for memory
while starting, with the estimate and a max_batch that fits (rollout.engine.sglang.sizing).
Pure arithmetic: runs without sglang-jax."""

from __future__ import annotations

import doctest
import re

import pytest

from rollout.engine.config import EngineConfig
from rollout.engine.sglang import sizing
from rollout.models.config import ModelConfig

QWEN3_06B = ModelConfig("Qwen3ForCausalLM", 151936, 1024, 3072, 28, 16, 8, 128, 1e6, 1e-6, True, 40960, True, False)
HOST_24GIB = [16.0 * 2**30]  # Ray's `memory` resource of a 24 GiB host with a few GiB in use


def test_the_default_sizes_on_a_24_gib_cpu_host_are_refused_with_the_estimate_and_a_max_batch_that_fits():
    with pytest.raises(MemoryError) as caught:
        sizing.check_host_memory(QWEN3_06B, EngineConfig(), 2, HOST_24GIB)
    message = str(caught.value)
    assert "max_batch=64 x max_seq_len=2048 (float32) needs about 32.3 GiB per worker" in message
    assert "KV pool 28.1 GiB" in message and "dtype='bfloat16'" in message
    fits = int(re.search(r"lower max_batch to (\d+)", message).group(1))
    assert fits >= 1
    sizing.check_host_memory(QWEN3_06B, EngineConfig(max_batch=fits), 2, HOST_24GIB)  # the advice fits
    with pytest.raises(MemoryError):
        sizing.check_host_memory(QWEN3_06B, EngineConfig(max_batch=fits + 1), 2, HOST_24GIB)


def test_a_small_engine_fits():
    sizing.check_host_memory(QWEN3_06B, EngineConfig(max_batch=8, max_seq_len=512), 2, HOST_24GIB)


def test_the_worked_example_holds():
    assert doctest.testmod(sizing).failed == 0
