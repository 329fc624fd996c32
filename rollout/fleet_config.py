"""FleetConfig: how the fleet is laid out and how its weight syncs and retries behave.

Both sides read it: the coordinator (placement, syncs, re-sends, start-up) and each worker actor
(its devices, its engine backend, its bucket inbox limits), to which it is handed at
construction. So it lives beside `rollout.protocol`, in neither `coordinator/` nor `worker/`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from rollout.weights.buckets import CHECKSUMS, DEFAULT_CHECKSUM

ACCELERATORS = ("auto", "cpu", "tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """How the fleet is laid out and how its weight syncs and retries behave."""

    num_workers: int = 2  # engines; each takes whole prompts, so more workers = more throughput
    devices_per_worker: int = 4  # TPU chips / GPUs / simulated CPU devices per engine (one mesh)
    accelerator: str = "auto"  # auto: TPU if the cluster has TPU resources, else GPU, else CPU
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per worker (its scheduler and fetch threads)
    bucket_bytes: int = 256 << 20  # object-store bucket size: fewer objects vs. bigger fetch units
    max_inflight_buckets: int = 4  # buckets a worker fetches at once: bounds its transient memory
    checksum: str = DEFAULT_CHECKSUM  # bucket checksum: xxh3_64 (memory speed) or crc32 (~0.3 s/GiB per reader)
    # Worker nodes that each relay a sync's buckets to (rollout/relay.py): the coordinator's node
    # sends one model per sync, not one per worker node. 0: every worker fetches from the coordinator.
    relay_fanout: int = 2
    sync_timeout_s: float = 600.0  # the stage phase must finish within this, else abort everywhere
    ready_timeout_s: float = 600.0  # workers must build their engines within this at start
    max_restarts: int = -1  # Ray restarts of a dead worker; -1 = forever, 0 = never
    # Failed starts (process died before it was ready) of a worker before start-up gives up with
    # the cause: its engine failing the same way each time (killed for memory, crashing) would
    # otherwise be restarted until ready_timeout_s (rollout.coordinator.startup).
    start_attempts: int = 3
    max_request_retries: int = 3  # re-sends of a request whose worker died, before giving up
    sync_history: int = 32  # syncs kept (with phase timings) in status()
    check_resources: bool = True  # False: skip the pre-check (autoscaling clusters add nodes)
    # Extra environment of worker processes, e.g. {"JAX_COMPILATION_CACHE_DIR": "/cache"} so a
    # restarted worker reuses compiled programs instead of compiling again.
    env_vars: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # The engine backend of every worker: a name in rollout.engine.backend.BACKENDS ("native":
    # rollout's engine; "sglang-jax": an sglang-jax Engine, Python >= 3.12 and the `sglang` extra,
    # drain swaps only, no logprobs or scoring: see README), or a factory (model, EngineConfig,
    # devices) -> EngineBackend (picklable; built in the worker).
    engine: str | Callable[..., Any] = "native"

    def __post_init__(self) -> None:
        from rollout.engine.backend import check_engine  # not at import: `import rollout` stays light

        check_engine(self.engine)
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator={self.accelerator!r}: expected one of {ACCELERATORS}")
        for name in ("num_workers", "devices_per_worker", "max_inflight_buckets", "sync_history", "start_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        if not isinstance(self.bucket_bytes, int) or self.bucket_bytes < 1 << 10:
            raise ValueError(f"bucket_bytes={self.bucket_bytes!r}: expected an integer >= 1024")
        if self.checksum not in CHECKSUMS:
            raise ValueError(f"checksum={self.checksum!r}: expected one of {CHECKSUMS}")
        if not isinstance(self.relay_fanout, int) or isinstance(self.relay_fanout, bool) or self.relay_fanout < 0:
            raise ValueError(f"relay_fanout={self.relay_fanout!r}: expected an integer >= 0 (0 turns the relay off)")
        if self.max_restarts < -1 or self.max_request_retries < 0:
            raise ValueError("max_restarts must be >= -1 and max_request_retries >= 0")
        if self.cpus_per_worker < 0 or self.sync_timeout_s <= 0 or self.ready_timeout_s <= 0:
            raise ValueError("cpus_per_worker must be >= 0 and the timeouts > 0 seconds")
