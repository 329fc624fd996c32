"""FaultyWorker: the product's worker (rollout.worker.actor.RolloutWorker) with faults a test injects.

The product's request path has no fault hooks; tests start a fleet whose workers are this
subclass (`RolloutService(..., worker_class=FaultyWorker)`) and arm it through its own remote
calls:

    ray.get(svc.workers[1].inject_fault.remote("stage", delay_s=13))    # hang in the next stage
    ray.get(svc.workers[1].inject_fault.remote("commit", message="x"))  # the next commit raises
    ray.get(svc.workers[0].inject_fault.remote("generate", delay_s=2))  # stall before generating
    ray.get(svc.workers[0].corrupt_buckets.remote(byte=3))              # flip a bit of each bucket fed
    ray.get(svc.workers[0].clear_faults.remote())

A fault sleeps `delay_s` and/or raises InjectedFault(`message`) before the real call runs, the
next `times` times. `committed_update()` returns what the registry holds (the security case
reads it). A restarted worker starts with no faults armed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from rollout.protocol import CommittedUpdate, RelayRole, StageReport
from rollout.worker.actor import RolloutWorker

FAULT_POINTS = ("stage", "commit", "generate")

# Worker processes cannot import the tests: ship this module's code with the actor class.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class InjectedFault(RuntimeError):
    """A failure a test asked for with `inject_fault`."""


class FaultyWorker(RolloutWorker):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._faults: dict[str, tuple[str | None, float, int]] = {}  # point -> (message, delay_s, times left)
        self._corrupt_byte: int | None = None

    # -- arming (remote calls of the tests) ---------------------------------------------------

    async def inject_fault(self, point: str, message: str | None = None, delay_s: float = 0.0, times: int = 1) -> None:
        """The next `times` calls of `point` ("stage" (also stage_checkpoint), "commit" or "generate"
        (also generate_stream)) sleep
        `delay_s` and then raise InjectedFault(`message`) if a message is given."""
        if point not in FAULT_POINTS:
            raise ValueError(f"fault point {point!r}: expected one of {FAULT_POINTS}")
        self._faults[point] = (message, float(delay_s), int(times))

    async def corrupt_buckets(self, byte: int = 3) -> None:
        """Until clear_faults: every bucket fed to this worker arrives with bit 0 of `byte`
        flipped (the coordinator's checksum travels unchanged beside it)."""
        self._corrupt_byte = byte

    async def clear_faults(self) -> None:
        self._faults.clear()
        self._corrupt_byte = None

    async def committed_update(self) -> CommittedUpdate | None:
        """The registry's last committed update, as a restarting worker would load it."""
        return await self.registry.latest.remote()

    # -- the product's calls, with the faults in front ----------------------------------------

    async def _hit(self, point: str) -> None:
        fault = self._faults.pop(point, None)
        if fault is None:
            return
        message, delay_s, times = fault
        if times > 1:
            self._faults[point] = (message, delay_s, times - 1)
        await asyncio.sleep(delay_s)
        if message is not None:
            raise InjectedFault(message)

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        await self._hit("generate")
        return await super().generate(*args, **kwargs)

    async def generate_stream(self, *args: Any, **kwargs: Any) -> Any:
        await self._hit("generate")
        async for deltas in super().generate_stream(*args, **kwargs):
            yield deltas

    async def stage(self, sync_id: str, manifest: bytes, relay: RelayRole | None = None) -> StageReport:
        await self._hit("stage")
        return await super().stage(sync_id, manifest, relay)

    async def stage_checkpoint(self, sync_id: str, version: int, path: str) -> StageReport:
        await self._hit("stage")
        return await super().stage_checkpoint(sync_id, version, path)

    async def commit(self, sync_id: str, version: int) -> int:
        await self._hit("commit")
        return await super().commit(sync_id, version)

    async def feed(self, sync_id: str, index: int, bucket_ref: Sequence[Any], checksum: int | None = None) -> str | None:
        if self._corrupt_byte is not None:
            bucket = np.array(await bucket_ref[0])  # a writable copy of the object-store bytes
            bucket[self._corrupt_byte] ^= 0x01
            bucket_ref = [ray.put(bucket)]
        return await super().feed(sync_id, index, bucket_ref, checksum)
