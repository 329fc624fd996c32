"""KV cache layouts of the native engine, as plug-ins chosen by one factory.

A layout supplies the two things that depend on where K/V live: the runner (the jitted prefill
and decode over that cache, holding the serving parameters) and the scheduler (what to admit,
and what to do when the cache is full). The engine builds one through `make_layout` and never
branches on `EngineConfig.kv_layout` itself.

- `contiguous`: `max_batch` slots of `max_seq_len` positions each (`ModelRunner`, `Scheduler`).
- `paged`: a pool of fixed-size pages shared through page tables (`PagedRunner`,
  `PagedScheduler`: admission planned by pages, preemption).

A layout module returns a `KvLayout` (kv/layout.py, what every layout supplies). Layouts import
the engine's lower floors (runner, scheduler base, sampling); nothing here imports
`rollout.engine.native.engine`. Importing this package does not import jax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rollout.engine.config import KV_LAYOUTS  # the one list: EngineConfig and the CLI check it
from rollout.engine.native.kv.layout import KvLayout

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from rollout.engine.config import EngineConfig
    from rollout.models.bind import ModelDef

__all__ = ["KV_LAYOUTS", "KvLayout", "make_layout"]


def make_layout(model_def: ModelDef, mesh: Mesh, config: EngineConfig) -> KvLayout:
    """The layout `config.kv_layout` names, its device cache allocated."""
    if config.kv_layout == "contiguous":
        from rollout.engine.native.kv.contiguous import make_contiguous

        return make_contiguous(model_def, mesh, config)
    if config.kv_layout == "paged":
        from rollout.engine.native.kv.paged.setup import make_paged

        return make_paged(model_def, mesh, config)
    raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {config.kv_layout!r}")
