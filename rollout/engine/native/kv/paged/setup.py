"""The paged KV layout from an EngineConfig: pool size, runner, page pool and scheduler.

Pool size, in order: `kv_pages`; else `kv_memory_fraction` of device memory less what is in
use (the weights about to be loaded are counted as their per-device share); else the memory the
contiguous layout would take (max_batch x max_seq_len positions), so switching the layout alone
changes no memory use.
"""

from __future__ import annotations

from jax.sharding import Mesh

from rollout.engine.config import EngineConfig
from rollout.engine.native.kv.layout import KvLayout
from rollout.engine.native.kv.paged import memory
from rollout.engine.native.kv.paged.pool import PagePool, pages_for
from rollout.engine.native.kv.paged.runner import PagedRunner
from rollout.engine.native.kv.paged.scheduler import PagedScheduler
from rollout.models.bind import ModelDef


def pool_pages(model_def: ModelDef, mesh: Mesh, config: EngineConfig) -> int:
    cfg, devices = model_def.config, list(mesh.devices.flat)
    if config.kv_pages is not None:
        pages = config.kv_pages
    elif config.kv_memory_fraction is not None:
        weights = model_def.spec.nbytes // len(devices)
        pages = memory.pages_from_device_memory(
            cfg, config.page_size, config.dtype, devices, config.kv_memory_fraction, reserved_bytes=weights
        )
    else:
        pages = config.max_batch * pages_for(config.max_seq_len, config.page_size)
    need = pages_for(config.max_seq_len, config.page_size)
    if pages < need:
        raise ValueError(
            f"a pool of {pages} pages of {config.page_size} tokens cannot hold one sequence of "
            f"max_seq_len={config.max_seq_len} ({need} pages): raise kv_pages or lower max_seq_len"
        )
    return pages


def make_paged(model_def: ModelDef, mesh: Mesh, config: EngineConfig) -> KvLayout:
    """The runner (its device pool allocated) and a scheduler over the host bookkeeping of the
    same pages."""
    pages = pool_pages(model_def, mesh, config)
    runner = PagedRunner(
        model_def, mesh, max_batch=config.max_batch, max_seq_len=config.max_seq_len,
        decode_steps=config.decode_steps, num_pages=pages, page_size=config.page_size,
        batch_invariant=config.batch_invariant,
    )
    pool = PagePool(pages, config.page_size, prefix_cache=config.prefix_cache)
    return KvLayout("paged", runner, lambda lock, weights: PagedScheduler(lock, runner, weights, config, pool))
