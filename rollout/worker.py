"""The worker: a Ray actor hosting one Engine on its devices, and the receiving half of a sync.

`EngineHost` is the plain class (engine, stage/commit/abort bookkeeping per sync attempt,
catching up with a committed update, test fault injection); `RolloutWorker` is the thin async
Ray actor around it. Generation awaits engine futures on the actor's event loop, so many
requests are in flight at once; weight work (staging, catching up) runs in a one-thread
executor, so serving goes on while an update is staged.

Receiving an update: fetch the buckets from the object store (at most `max_inflight_buckets` at
a time, zero-copy), check every bucket's CRC-32 before anything is staged, cut the buckets into
leaf views with the manifest and `engine.stage` them (which validates, checks finiteness and
copies onto the devices: nothing aliases object-store memory). Commit swaps them in.

A (re)started worker first loads the last committed update from the registry, so it never
serves an older version than the fleet's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import ray

from rollout.engine.config import EngineConfig
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion, EngineClosedError, WeightSyncError
from rollout.weights.buckets import Manifest, unpack, verify, verify_bucket
from rollout.weights.spec import ParamSpec

log = logging.getLogger("rollout.worker")

FAULT_POINTS = ("stage", "commit", "generate")
CATCH_UP = "catch-up"  # sync id of updates a worker applies on its own from the registry


class InjectedFault(RuntimeError):
    """A failure a test asked for with `inject_fault`."""


class SyncAbortedError(WeightSyncError):
    """The sync attempt was aborted by the coordinator before this worker finished staging."""


class FaultInjector:
    """Test-only failures at named points: raise `message` and/or sleep `delay_s`, `times` times."""

    def __init__(self) -> None:
        self._faults: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    def arm(self, point: str, message: str | None = None, delay_s: float = 0.0, times: int = 1) -> None:
        if point not in FAULT_POINTS:
            raise ValueError(f"fault point {point!r}: expected one of {FAULT_POINTS}")
        with self._lock:
            self._faults[point] = [message, float(delay_s), int(times)]

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self, point: str) -> tuple[str | None, float] | None:
        with self._lock:
            fault = self._faults.get(point)
            if fault is None:
                return None
            fault[2] -= 1
            if fault[2] <= 0:
                del self._faults[point]
            return fault[0], fault[1]

    def hit(self, point: str) -> None:
        fault = self._take(point)
        if fault is not None:
            time.sleep(fault[1])
            if fault[0] is not None:
                raise InjectedFault(fault[0])

    async def hit_async(self, point: str) -> None:
        fault = self._take(point)
        if fault is not None:
            await asyncio.sleep(fault[1])
            if fault[0] is not None:
                raise InjectedFault(fault[0])


class EngineHost:
    """One Engine and the worker's side of the two-phase sync, per sync attempt (`sync_id`).

    An attempt the coordinator aborted never ends up staged, even if its staging was still
    running when the abort arrived.
    """

    def __init__(self, model: str, engine_config: EngineConfig, devices_per_worker: int):
        import jax

        from rollout.engine.engine import Engine

        devices = jax.local_devices()
        if len(devices) < devices_per_worker:
            raise RuntimeError(
                f"expected {devices_per_worker} devices for this worker, jax sees {len(devices)} "
                f"({devices[0].platform}); on CPU the count comes from XLA_FLAGS="
                "--xla_force_host_platform_device_count, which must be set before jax is imported; "
                f"on TPU/GPU lower devices_per_worker to the chips per host (XLA_FLAGS here: "
                f"{os.environ.get('XLA_FLAGS')!r})"
            )
        self.engine = Engine(model, engine_config, devices[:devices_per_worker])
        self.faults = FaultInjector()
        self._lock = threading.Lock()
        self._staged_sync: str | None = None
        self._aborted: set[str] = set()

    def stage_buffers(self, sync_id: str, manifest: Manifest, buffers: Sequence[np.ndarray]) -> None:
        """Stage an update whose buckets were already verified."""
        self.faults.hit("stage")
        self._check_not_aborted(sync_id)
        self.engine.stage(manifest.version, unpack(manifest, buffers))
        self._mark_staged(sync_id, manifest.version)

    def stage_checkpoint(self, sync_id: str, version: int, path: str) -> None:
        self.faults.hit("stage")
        self._check_not_aborted(sync_id)
        self.engine.stage_checkpoint(version, path)
        self._mark_staged(sync_id, version)

    def commit(self, sync_id: str, version: int) -> bool:
        """Commit what `sync_id` staged. False if this worker does not hold it (it restarted
        after staging): the caller then catches up from the registry."""
        self.faults.hit("commit")
        with self._lock:
            if self._staged_sync == sync_id and self.engine.staged_version == version:
                self.engine.commit(version)
                self._staged_sync = None
                return True
        return self.engine.version >= version

    def abort(self, sync_id: str, version: int) -> bool:
        with self._lock:
            self._aborted.add(sync_id)
            if self._staged_sync == sync_id:
                self._staged_sync = None
                return self.engine.abort(version)
        return False

    def apply(self, update: dict[str, Any], buffers: Sequence[np.ndarray] | None) -> int:
        """Stage and commit a committed update (catching up); waits until it serves."""
        version = int(update["version"])
        if version <= self.engine.version:
            return self.engine.version
        if update["kind"] == "buckets":
            manifest = Manifest.from_bytes(update["manifest"])
            verify(manifest, buffers or [])
            self.engine.stage(version, unpack(manifest, buffers or []))
        else:
            self.engine.stage_checkpoint(version, update["path"])
        with self._lock:
            self._staged_sync = CATCH_UP
        self.engine.commit(version, wait=True, timeout=600)
        with self._lock:
            self._staged_sync = None
        log.info("worker caught up with committed version %d", version)
        return version

    def _check_not_aborted(self, sync_id: str) -> None:
        with self._lock:
            if sync_id in self._aborted:
                raise SyncAbortedError(f"sync {sync_id} was aborted before this worker staged it")

    def _mark_staged(self, sync_id: str, version: int) -> None:
        with self._lock:
            if sync_id in self._aborted:
                self.engine.abort(version)
                raise SyncAbortedError(f"sync {sync_id} was aborted while this worker staged it")
            self._staged_sync = sync_id


class RolloutWorker:
    """Ray actor (async) around an EngineHost. Created by RolloutService; see module docstring."""

    def __init__(
        self,
        index: int,
        model: str,
        engine_config: EngineConfig,
        devices_per_worker: int,
        registry_name: str,
        namespace: str,
        max_inflight_buckets: int = 4,
    ):
        logging.basicConfig(level=logging.INFO)
        self.index = index
        self._registry = ray.get_actor(registry_name, namespace=namespace)
        self.starts = ray.get(self._registry.worker_started.remote(index))
        self.host = EngineHost(model, engine_config, devices_per_worker)
        self._max_inflight = max_inflight_buckets
        self._weights_pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-weights")
        self._verify_pool = ThreadPoolExecutor(2, thread_name_prefix="rollout-verify")
        self._catch_up_blocking()  # a restarted worker serves the fleet's version from its first request

    # -- serving ------------------------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        status = self.host.engine.status()
        if not status["alive"]:
            raise EngineClosedError(f"worker {self.index}: the engine's scheduler is not running")
        return {
            "index": self.index,
            "version": self.host.engine.version,
            "starts": self.starts,
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "devices": status["devices"],
        }

    async def spec(self) -> ParamSpec:
        return self.host.engine.spec

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, prompt_index: int, return_logprobs: bool
    ) -> list[Completion]:
        await self.host.faults.hit_async("generate")
        engine = self.host.engine
        future = engine.submit(prompt_ids, sampling, prompt_index=prompt_index, return_logprobs=return_logprobs)
        try:
            # shield: a cancelled call must not cancel the engine's future under its scheduler
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            engine.cancel(future)
            raise
        except EngineClosedError:
            if not engine.status()["alive"]:  # the scheduler crashed: restart this process
                log.error("worker %d: engine scheduler died; exiting so Ray restarts the worker", self.index)
                asyncio.get_running_loop().call_later(0.5, os._exit, 70)
            raise

    # -- weight sync --------------------------------------------------------------------------

    async def stage(self, sync_id: str, manifest_bytes: bytes, bucket_refs: list[ray.ObjectRef]) -> dict[str, Any]:
        """Phase 1: fetch and verify every bucket, then stage (serving goes on meanwhile)."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        manifest = Manifest.from_bytes(manifest_bytes)
        buffers = await self._fetch_verified(manifest, bucket_refs)
        fetched = time.perf_counter()
        await loop.run_in_executor(self._weights_pool, self.host.stage_buffers, sync_id, manifest, buffers)
        del buffers  # release the object-store pins; the staged copies live on the devices
        return {"fetch_verify_s": fetched - start, "stage_s": time.perf_counter() - fetched}

    async def stage_checkpoint(self, sync_id: str, version: int, path: str) -> dict[str, Any]:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._weights_pool, self.host.stage_checkpoint, sync_id, version, path)
        return {"stage_s": time.perf_counter() - start}

    async def commit(self, sync_id: str, version: int) -> int:
        """Phase 2. A worker that lost its staged copy (restarted) catches up from the registry."""
        if not self.host.commit(sync_id, version):
            await self.catch_up()
        return self.host.engine.version

    async def abort(self, sync_id: str, version: int) -> bool:
        return self.host.abort(sync_id, version)

    async def catch_up(self) -> int:
        """Load the registry's last committed update if it is newer than what this worker serves."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._weights_pool, self._catch_up_blocking)

    def _catch_up_blocking(self) -> int:
        update = ray.get(self._registry.latest.remote())
        if update is None or update["version"] <= self.host.engine.version:
            return self.host.engine.version
        buffers = ray.get(list(update["refs"])) if update["kind"] == "buckets" else None
        return self.host.apply(update, buffers)

    async def _fetch_verified(self, manifest: Manifest, refs: Sequence[ray.ObjectRef]) -> list[np.ndarray]:
        if len(refs) != len(manifest.layout.bucket_nbytes):
            raise ValueError(f"expected {len(manifest.layout.bucket_nbytes)} bucket refs, got {len(refs)}")
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self._max_inflight)

        async def fetch(index: int, ref: ray.ObjectRef) -> np.ndarray:
            async with limit:
                buffer = await ref
                await loop.run_in_executor(self._verify_pool, verify_bucket, manifest, index, buffer)
                return buffer

        return list(await asyncio.gather(*(fetch(i, r) for i, r in enumerate(refs))))

    # -- status, tests, lifecycle ---------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        status = self.host.engine.status()
        status.update(index=self.index, starts=self.starts, restarts=self.starts - 1, pid=os.getpid())
        return status

    async def inject_fault(self, point: str, message: str | None = None, delay_s: float = 0.0, times: int = 1) -> None:
        """Test-only: make the next `times` passes through `point` sleep and/or raise."""
        self.host.faults.arm(point, message, delay_s, times)

    async def clear_faults(self) -> None:
        self.host.faults.clear()

    async def shutdown(self) -> None:
        self.host.engine.shutdown()
