"""The paged KV cache's memory model: bytes per page, and pool size from a memory budget.

One page holds `page_size` positions of K and V for every layer and KV head:

    page bytes = 2 (K, V) x layers x kv_heads x page_size x head_dim x dtype bytes

split over the devices when the KV heads are sharded (kv_heads divisible by the device count),
else every device holds every head (replicated). A contiguous cache of max_batch slots holds
max_batch x max_seq_len positions whatever the sequences' real lengths; a pool of P pages holds
P x page_size positions shared by whichever sequences are running.

On a TPU (or GPU) the pool can be sized as a fraction of device memory, vLLM-style: the pool
takes `fraction` x the device's memory limit minus what is already in use there (the weights,
a staged copy being made, XLA's buffers), measured when the engine starts. Leave room for a
staged weight copy (one model's bytes per device) if syncs run while serving.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rollout.models.config import ModelConfig


def kv_heads_per_device(cfg: ModelConfig, devices: int) -> int:
    """KV heads each device holds: sharded when they divide evenly, else all of them."""
    return cfg.num_kv_heads // devices if devices > 1 and cfg.num_kv_heads % devices == 0 else cfg.num_kv_heads


def page_bytes(cfg: ModelConfig, page_size: int, dtype: str, devices: int = 1) -> int:
    """Bytes of one page on each device (all layers, K and V)."""
    itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
    return 2 * cfg.num_layers * kv_heads_per_device(cfg, devices) * page_size * cfg.head_dim * itemsize


def contiguous_bytes(cfg: ModelConfig, max_batch: int, max_seq_len: int, dtype: str, devices: int = 1) -> int:
    """Bytes per device of the contiguous cache (max_batch slots of max_seq_len positions)."""
    return page_bytes(cfg, max_seq_len, dtype, devices) * max_batch


def pages_in_budget(cfg: ModelConfig, page_size: int, dtype: str, budget_bytes: int, devices: int = 1) -> int:
    """Pages that fit in `budget_bytes` per device."""
    return budget_bytes // page_bytes(cfg, page_size, dtype, devices)


def pages_from_device_memory(
    cfg: ModelConfig, page_size: int, dtype: str, devices: Sequence, fraction: float, reserved_bytes: int = 0
) -> int:
    """Pages for `fraction` of device memory, less what is in use now and `reserved_bytes` per
    device (e.g. weights not loaded yet).

    Needs devices that report memory (TPU, GPU); the least free device decides.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"kv_memory_fraction={fraction!r}: expected a number in (0, 1]")
    budgets = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            raise ValueError(
                f"device {device} does not report its memory, so the KV pool cannot be sized as a "
                f"fraction of it; give the pool size in pages (kv_pages) instead"
            )
        budgets.append(int(stats["bytes_limit"] * fraction) - int(stats.get("bytes_in_use", 0)) - reserved_bytes)
    budget = min(budgets)
    pages = pages_in_budget(cfg, page_size, dtype, max(budget, 0), len(devices))
    if pages < 1:
        raise ValueError(
            f"kv_memory_fraction={fraction} leaves {budget} bytes per device after what is in use; "
            f"one page needs {page_bytes(cfg, page_size, dtype, len(devices))}: raise the fraction"
        )
    return pages
