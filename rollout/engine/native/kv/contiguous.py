"""The contiguous KV layout: `max_batch` slots of `max_seq_len` positions, one per sequence.

Memory is reserved for every slot's full length up front, so admission only needs a free slot
and nothing is ever preempted. The runner and scheduler live one floor down
(`rollout.engine.native.runner`, `rollout.engine.native.scheduler`) because the paged layout
builds on them.
"""

from __future__ import annotations

from jax.sharding import Mesh

from rollout.engine.config import EngineConfig
from rollout.engine.native.kv.layout import KvLayout
from rollout.engine.native.runner import ModelRunner
from rollout.engine.native.scheduler import Scheduler
from rollout.models.bind import ModelDef


def make_contiguous(model_def: ModelDef, mesh: Mesh, config: EngineConfig) -> KvLayout:
    runner = ModelRunner(
        model_def, mesh, max_batch=config.max_batch, max_seq_len=config.max_seq_len, decode_steps=config.decode_steps,
        batch_invariant=config.batch_invariant,
    )
    return KvLayout("contiguous", runner, lambda lock, weights: Scheduler(lock, runner, weights, config))
