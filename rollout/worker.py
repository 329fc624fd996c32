"""The worker: a Ray actor hosting one Engine on its devices, and the receiving half of a sync.

`EngineHost` is the plain class (engine, stage/commit/abort bookkeeping per sync attempt,
catching up with a committed update, test fault injection); `RolloutWorker` is the thin async
Ray actor around it. Generation awaits engine futures on the actor's event loop, so many
requests are in flight at once; weight work (staging, catching up) runs in a one-thread
executor, so serving goes on while an update is staged.

Receiving an update: `stage(sync_id, manifest)` starts `engine.stage` on a BucketInbox tree at
once; buckets arrive by `feed(sync_id, index, [ref])` calls while the coordinator is still
putting later ones. Each bucket is fetched from the object store (zero-copy, at most
`max_inflight_buckets` at a time) and its checksum verified before any of its bytes is read;
the engine validates and copies each leaf onto the devices (nothing aliases object-store
memory), so staging overlaps the transfer. Finiteness was counted by the coordinator's packer
(the manifest says so and the checksums prove these are its bytes), so no worker rereads the
values for it; a checkpoint staged from disk is checked here. Commit swaps the staged leaves in.

A (re)started worker first loads the last committed update from the registry, so it never
serves an older version than the fleet's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import ray

from rollout.engine.backend import EngineBackend
from rollout.engine.config import EngineConfig
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion, EngineClosedError, WeightSyncError
from rollout.weights.buckets import Manifest, unpack, verify, verify_bucket
from rollout.weights.inbox import BucketInbox
from rollout.weights.spec import ParamSpec

log = logging.getLogger("rollout.worker")

FAULT_POINTS = ("stage", "commit", "generate")
CATCH_UP = "catch-up"  # sync id of updates a worker applies on its own from the registry


class InjectedFault(RuntimeError):
    """A failure a test asked for with `inject_fault`."""


class SyncAbortedError(WeightSyncError):
    """The sync attempt was aborted by the coordinator before this worker finished staging."""


class RecentIds:
    """The last `limit` ids added: enough to recognise the late calls of an attempt that ended
    (they arrive within seconds), without growing over a long run."""

    def __init__(self, limit: int = 256):
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._limit = limit

    def add(self, sync_id: str) -> None:
        self._ids[sync_id] = None
        self._ids.move_to_end(sync_id)
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)

    def __contains__(self, sync_id: object) -> bool:
        return sync_id in self._ids


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

    def __init__(self, model: str, engine_config: EngineConfig, devices_per_worker: int, engine: str = "native"):
        import jax

        devices = jax.local_devices()
        if len(devices) < devices_per_worker:
            raise RuntimeError(
                f"expected {devices_per_worker} devices for this worker, jax sees {len(devices)} "
                f"({devices[0].platform}); on CPU the count comes from XLA_FLAGS="
                "--xla_force_host_platform_device_count, which must be set before jax is imported; "
                f"on TPU/GPU lower devices_per_worker to the chips per host (XLA_FLAGS here: "
                f"{os.environ.get('XLA_FLAGS')!r})"
            )
        if engine == "sglang-jax":
            from rollout.engine.sglang import create_engine

            self.engine: EngineBackend = create_engine(model, engine_config, devices[:devices_per_worker])
        else:
            from rollout.engine.engine import Engine

            self.engine = Engine(model, engine_config, devices[:devices_per_worker])
        self.faults = FaultInjector()
        self._lock = threading.Lock()
        self._staged_sync: str | None = None
        self._aborted = RecentIds()

    def stage_inbox(self, sync_id: str, inbox: BucketInbox) -> None:
        """Stage an update whose verified buckets arrive in `inbox` (possibly still arriving)."""
        self.faults.hit("stage")
        self._check_not_aborted(sync_id)
        self.engine.stage(inbox.manifest.version, inbox.tree(), finite_checked=inbox.manifest.finite)
        self._mark_staged(sync_id, inbox.manifest.version)

    def stage_checkpoint(self, sync_id: str, version: int, path: str) -> None:
        self.faults.hit("stage")
        self._check_not_aborted(sync_id)
        self.engine.stage_checkpoint(version, path)
        self._mark_staged(sync_id, version)

    def commit(self, sync_id: str, version: int) -> bool:
        """Commit what `sync_id` staged. False if this worker does not hold it (it restarted
        after staging): the caller then catches up from the registry."""
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
            self.engine.stage(version, unpack(manifest, buffers or []), finite_checked=manifest.finite)
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
        sync_timeout_s: float = 600.0,
        engine: str = "native",
    ):
        logging.basicConfig(level=logging.INFO)
        self.index = index
        self._registry = ray.get_actor(registry_name, namespace=namespace)
        self.starts = 0  # set by _start: how many times this worker has been started
        self.host = EngineHost(model, engine_config, devices_per_worker, engine)
        self._fetch_limit = asyncio.Semaphore(max_inflight_buckets)
        self._sync_timeout_s = sync_timeout_s
        self._inboxes: dict[str, BucketInbox] = {}
        # Ray does not order an async actor's calls: a bucket's feed may run before its stage.
        # Such buckets wait here (by sync id) until the stage call picks them up.
        self._early: collections.OrderedDict[str, list[tuple[int, ray.ObjectRef, int | None]]] = (
            collections.OrderedDict()
        )
        self._finished = RecentIds()  # syncs staged or aborted here
        self._weights_pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-weights")
        self._verify_pool = ThreadPoolExecutor(2, thread_name_prefix="rollout-verify")
        self._started: asyncio.Future[None] | None = None

    async def _start(self) -> None:
        """Before the first call is served: count this start and load the fleet's committed
        version, so a restarted worker never serves an older one. (Not in __init__: a blocking
        ray.get there would stall the actor's event loop.)"""
        failed = self._started is not None and self._started.done() and (
            self._started.cancelled() or self._started.exception() is not None
        )
        if self._started is None or failed:  # first call, or retry a start that failed
            self._started = asyncio.ensure_future(self._register_and_catch_up())
        await asyncio.shield(self._started)

    async def _register_and_catch_up(self) -> None:
        self.starts = await self._registry.worker_started.remote(self.index)
        await self.catch_up()

    # -- serving ------------------------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        await self._start()
        status = self.host.engine.status()
        if not status["alive"]:  # the scheduler crashed: restart this process
            asyncio.get_running_loop().call_later(0.5, os._exit, 70)
            raise EngineClosedError(f"worker {self.index}: the engine's scheduler is not running; restarting")
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
        await self._start()
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

    async def stage(self, sync_id: str, manifest_bytes: bytes, bucket_refs: list[ray.ObjectRef] | None = None) -> dict[str, Any]:
        """Phase 1: stage the update of `manifest_bytes`; serving goes on meanwhile.

        Its buckets come in `bucket_refs` (a list, so Ray passes the refs unresolved) or by
        `feed` calls that may still be arriving. Returns timings.
        """
        await self._start()
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        if sync_id in self._finished:
            raise SyncAbortedError(f"sync {sync_id} was aborted before this worker staged it")
        manifest = Manifest.from_bytes(manifest_bytes)
        buckets = len(manifest.layout.bucket_nbytes)
        if bucket_refs and len(bucket_refs) != buckets:
            raise ValueError(
                f"the manifest of version {manifest.version} lists {buckets} buckets; expected as many "
                f"bucket refs, got {len(bucket_refs)} (pass all of them, or none and feed them)"
            )
        inbox = BucketInbox(manifest, self._sync_timeout_s)
        self._inboxes[sync_id] = inbox  # before any await: feeds that run after this find it
        arrivals = [(i, ref, None) for i, ref in enumerate(bucket_refs or [])]
        arrivals += self._early.pop(sync_id, [])  # feeds that ran before this call
        receiving = [asyncio.ensure_future(self._receive(inbox, *arrival)) for arrival in arrivals]
        try:
            await loop.run_in_executor(self._weights_pool, self.host.stage_inbox, sync_id, inbox)
        except BaseException as err:
            inbox.fail(err)
            raise
        finally:
            self._inboxes.pop(sync_id, None)
            self._remember_finished(sync_id)
            inbox.release()  # the staged copies live on the devices; unpin the object store
            for task in receiving:  # after a failure some buckets may never come
                task.cancel()
        return {"stage_s": time.perf_counter() - start, "waited_for_buckets_s": inbox.wait_s}

    async def feed(
        self, sync_id: str, index: int, bucket_ref: list[ray.ObjectRef], checksum: int | None = None
    ) -> str | None:
        """Deliver bucket `index` of a sync being staged (the ref inside a list, unresolved) with
        its checksum when the manifest has none. Returns None, or why the bucket was refused
        (the stage call raises the same)."""
        inbox = self._inboxes.get(sync_id)
        if inbox is not None:
            return await self._receive(inbox, index, bucket_ref[0], checksum)
        if sync_id in self._finished:
            return f"sync {sync_id} is no longer being staged here (aborted or finished)"
        self._early.setdefault(sync_id, []).append((index, bucket_ref[0], checksum))
        while len(self._early) > 4:  # a stage call that never came (its coordinator went away)
            self._early.popitem(last=False)
        return None

    def _remember_finished(self, sync_id: str) -> None:
        self._early.pop(sync_id, None)
        self._finished.add(sync_id)

    async def _receive(
        self, inbox: BucketInbox, index: int, ref: ray.ObjectRef, checksum: int | None = None
    ) -> str | None:
        loop = asyncio.get_running_loop()
        try:
            async with self._fetch_limit:
                buffer = await ref
                await loop.run_in_executor(
                    self._verify_pool, verify_bucket, inbox.manifest, index, buffer, checksum
                )
            inbox.deliver(index, buffer)
            return None
        except Exception as err:  # noqa: BLE001 - the stage call reports it
            inbox.fail(err)
            return f"{type(err).__name__}: {err}"

    async def stage_checkpoint(self, sync_id: str, version: int, path: str) -> dict[str, Any]:
        await self._start()
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._weights_pool, self.host.stage_checkpoint, sync_id, version, path)
        return {"stage_s": time.perf_counter() - start}

    async def commit(self, sync_id: str, version: int) -> int:
        """Phase 2. A worker that lost its staged copy (restarted) catches up from the registry."""
        await self._start()
        await self.host.faults.hit_async("commit")
        if not self.host.commit(sync_id, version):
            await self.catch_up()
        return self.host.engine.version

    async def abort(self, sync_id: str, version: int) -> bool:
        self._remember_finished(sync_id)
        inbox = self._inboxes.get(sync_id)
        if inbox is not None:  # wake a staging thread that waits for buckets
            inbox.fail(SyncAbortedError(f"sync {sync_id} was aborted by the coordinator"))
        return self.host.abort(sync_id, version)

    async def catch_up(self) -> int:
        """Load the registry's last committed update if it is newer than what this worker serves."""
        update = await self._registry.latest.remote()
        if update is None or update["version"] <= self.host.engine.version:
            return self.host.engine.version
        buffers = list(await asyncio.gather(*update["refs"])) if update["kind"] == "buckets" else None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._weights_pool, self.host.apply, update, buffers)

    # -- status, tests, lifecycle ---------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        await self._start()
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
