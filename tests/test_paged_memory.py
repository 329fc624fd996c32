"""The paged KV memory model: bytes per page against the pool really allocated, and pool sizing
from a byte budget or a fraction of device memory."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from rollout.engine.native.kv.paged import attention, memory
from rollout.models.config import ModelConfig
from rollout.models.sharding import make_mesh


@pytest.fixture(scope="module")
def cfg(tiny_qwen3) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_qwen3)  # 2 layers, 2 KV heads, head_dim 32


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_page_bytes_equal_the_per_device_bytes_of_an_allocated_pool(cfg, devices):
    mesh = make_mesh(jax.devices()[:devices])
    pool = attention.init_pool(cfg, 10, 8, "float32", attention.pool_sharding(mesh, cfg))
    per_device = sum(
        shard.data.nbytes for k, v in pool for shard in (*k.addressable_shards[:1], *v.addressable_shards[:1])
    )
    assert per_device == 10 * memory.page_bytes(cfg, 8, "float32", devices)


def test_kv_heads_are_split_only_when_they_divide(cfg):
    assert memory.kv_heads_per_device(cfg, 2) == 1
    assert memory.kv_heads_per_device(cfg, 4) == 2  # 2 heads on 4 devices: replicated


def test_a_contiguous_cache_costs_max_batch_times_max_seq_len_positions(cfg):
    assert memory.contiguous_bytes(cfg, 8, 64, "bfloat16") == 8 * 4 * memory.page_bytes(cfg, 16, "bfloat16")
    assert memory.pages_in_budget(cfg, 16, "bfloat16", memory.contiguous_bytes(cfg, 8, 64, "bfloat16")) == 32


@dataclasses.dataclass
class ReportingDevice:
    """A device as jax describes an accelerator's memory (CPU devices report none)."""

    limit: int
    in_use: int

    def memory_stats(self) -> dict[str, int]:
        return {"bytes_limit": self.limit, "bytes_in_use": self.in_use}


def test_a_memory_fraction_takes_the_least_free_device_less_what_is_in_use(cfg):
    page = memory.page_bytes(cfg, 16, "bfloat16", 2)
    devices = [ReportingDevice(1000 * page, 100 * page), ReportingDevice(1000 * page, 300 * page)]
    assert memory.pages_from_device_memory(cfg, 16, "bfloat16", devices, 0.9) == 600


def test_a_memory_fraction_on_devices_that_report_no_memory_says_to_give_pages(cfg):
    with pytest.raises(ValueError, match="give the pool size in pages"):
        memory.pages_from_device_memory(cfg, 16, "float32", jax.devices()[:1], 0.5)


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_a_memory_fraction_outside_0_1_is_refused(cfg, fraction):
    with pytest.raises(ValueError, match=r"expected a number in \(0, 1\]"):
        memory.pages_from_device_memory(cfg, 16, "float32", [ReportingDevice(10, 0)], fraction)


def test_a_fraction_leaving_no_page_is_refused(cfg):
    page = memory.page_bytes(cfg, 16, "float32")
    with pytest.raises(ValueError, match="raise the fraction"):
        memory.pages_from_device_memory(cfg, 16, "float32", [ReportingDevice(10 * page, 9 * page)], 0.5)


def test_reserved_bytes_come_off_every_device(cfg):
    page = memory.page_bytes(cfg, 16, "bfloat16")
    device = ReportingDevice(1000 * page, 100 * page)
    assert memory.pages_from_device_memory(cfg, 16, "bfloat16", [device], 0.5, reserved_bytes=150 * page) == 250
