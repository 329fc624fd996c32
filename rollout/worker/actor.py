"""RolloutWorker: the Ray actor hosting one engine; a thin shell around a WorkerHost.

The actor builds its engine with the backend's factory (`FleetConfig.engine`, see
rollout.engine.backend), counts its starts in the registry, and before it serves its first
call catches up with the fleet's committed update, so a restarted worker never serves an older
version than the fleet's. Everything else (sync bookkeeping, buckets, catching up; serving:
generate, generate_stream, score) is `rollout.worker.host.WorkerHost`, tested without Ray, to
which each remote call delegates. Its remote calls are `rollout.protocol.WorkerCalls`. What the
host needs from Ray is injected: fetching a bucket from the object store, the registry's
committed update, and for the relay between nodes (rollout.relay) putting a relay copy into
this node's object store and asking a parent worker for its copy.

When the engine's scheduler has died, the worker exits its process (`_restart_if_engine_died`)
so that Ray restarts it with a fresh engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray

from rollout.engine.backend import EngineBackend, engine_factory
from rollout.engine.config import EngineConfig
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.streaming import TokenDelta
from rollout.engine.types import Completion, EngineClosedError
from rollout.fleet_config import FleetConfig
from rollout.protocol import ObjectRef, RelayRole, StageReport, WorkerReady, WorkerStatus
from rollout.weights.spec import ParamSpec
from rollout.worker.host import WorkerHost

log = logging.getLogger("rollout.worker.actor")

ENGINE_DIED_EXIT_CODE = 70  # EX_SOFTWARE: the process exits so that Ray restarts it


def build_engine(model: str, engine_config: EngineConfig, fleet: FleetConfig) -> EngineBackend:
    """The engine of one worker: `fleet.engine`'s factory on the first `devices_per_worker`
    local devices."""
    import jax

    devices = jax.local_devices()
    if len(devices) < fleet.devices_per_worker:
        raise RuntimeError(
            f"expected {fleet.devices_per_worker} devices for this worker, jax sees {len(devices)} "
            f"({devices[0].platform}); on CPU the count comes from XLA_FLAGS="
            "--xla_force_host_platform_device_count, which must be set before jax is imported; "
            f"on TPU/GPU lower devices_per_worker to the chips per host (XLA_FLAGS here: "
            f"{os.environ.get('XLA_FLAGS')!r})"
        )
    return engine_factory(fleet.engine)(model, engine_config, devices[: fleet.devices_per_worker])


class RolloutWorker:
    """Ray actor (async) around a WorkerHost. Created by RolloutService; `registry` is the
    update registry's actor handle (subclasses may read it)."""

    def __init__(
        self, index: int, model: str, engine_config: EngineConfig, fleet: FleetConfig, registry_name: str, namespace: str
    ):
        logging.basicConfig(level=logging.INFO)
        self.index = index
        self.registry = ray.get_actor(registry_name, namespace=namespace)
        self.starts = 0  # set by _start: how many times this worker has been started
        self.host = WorkerHost(
            build_engine(model, engine_config, fleet),
            fetch=_fetch,
            latest_update=self._latest_update,
            max_inflight_buckets=fleet.max_inflight_buckets,
            sync_timeout_s=fleet.sync_timeout_s,
            put_relay_copy=_put,
            relay_copy_from=_relay_copy_from,
        )
        self._started: asyncio.Future[None] | None = None

    async def _latest_update(self) -> Any:
        return await self.registry.latest.remote()

    async def _start(self) -> None:
        """Before the first call is served: count this start and catch up with the fleet's
        committed version. (Not in __init__: a blocking ray.get there would stall the actor's
        event loop.) A start that failed is retried by the next call."""
        failed = self._started is not None and self._started.done() and (
            self._started.cancelled() or self._started.exception() is not None
        )
        if self._started is None or failed:
            self._started = asyncio.ensure_future(self._register_and_catch_up())
        await asyncio.shield(self._started)

    async def _register_and_catch_up(self) -> None:
        self.starts = await self.registry.worker_started.remote(self.index)
        await self.host.catch_up()

    def _restart_if_engine_died(self) -> bool:
        """If the engine's scheduler died, exit this process shortly (Ray restarts the worker
        with a fresh engine) and say so."""
        if self.host.engine.status()["alive"]:
            return False
        log.error("worker %d: engine scheduler died; exiting so Ray restarts the worker", self.index)
        asyncio.get_running_loop().call_later(0.5, os._exit, ENGINE_DIED_EXIT_CODE)
        return True

    # -- serving ------------------------------------------------------------------------------

    async def ready(self) -> WorkerReady:
        await self._start()
        if self._restart_if_engine_died():
            raise EngineClosedError(f"worker {self.index}: the engine's scheduler is not running; restarting")
        return WorkerReady(
            index=self.index,
            version=self.host.engine.version,
            starts=self.starts,
            pid=os.getpid(),
            node_ip=ray.util.get_node_ip_address(),
            devices=self.host.engine.status()["devices"],
            capabilities=self.host.capabilities,
        )

    async def spec(self) -> ParamSpec:
        return self.host.engine.spec

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, prompt_index: int, return_logprobs: bool
    ) -> list[Completion]:
        await self._start()
        try:
            return await self.host.generate(prompt_ids, sampling, prompt_index, return_logprobs)
        except EngineClosedError:
            self._restart_if_engine_died()
            raise

    async def score(
        self,
        prompts: list[list[int]],
        completions: list[list[int]],
        temperature: float = 1.0,
        routed_experts: list[Any] | None = None,
        return_hidden_states: list[int] | None = None,
    ) -> Any:
        """Per-token logprobs of each completion after its prompt, `routed_experts` replayed
        when given, with the hidden states of `return_hidden_states` layers (WorkerHost.score)."""
        await self._start()
        return await self.host.score(prompts, completions, temperature, routed_experts, return_hidden_states)

    async def generate_stream(
        self, prompt_ids: list[int], sampling: SamplingParams, prompt_index: int, return_logprobs: bool
    ) -> AsyncIterator[list[TokenDelta]]:
        """Streaming generator (call with `.options(num_returns="streaming")`): the request's
        TokenDeltas (WorkerHost.generate_stream). Cancelling the stream (`ray.cancel`) stops the
        request at the engine's next step boundary."""
        await self._start()
        try:
            stream = self.host.generate_stream(prompt_ids, sampling, prompt_index, return_logprobs)
            async with contextlib.aclosing(stream):  # closing it cancels the request
                async for deltas in stream:
                    yield deltas
        except EngineClosedError:
            self._restart_if_engine_died()
            raise

    # -- weight sync (see rollout.protocol.WorkerCalls) -----------------------------------------

    async def stage(self, sync_id: str, manifest: bytes, relay: RelayRole | None = None) -> StageReport:
        await self._start()
        return await self.host.stage(sync_id, manifest, relay)

    async def feed(
        self, sync_id: str, index: int, bucket_ref: Sequence[ObjectRef], checksum: int | None = None
    ) -> str | None:
        return await self.host.feed(sync_id, index, bucket_ref[0], checksum)

    async def relay_copy(self, sync_id: str, index: int) -> list[ObjectRef]:
        return [await self.host.relay_copy(sync_id, index)]  # in a list: Ray passes the ref unresolved

    async def stage_checkpoint(self, sync_id: str, version: int, path: str) -> StageReport:
        await self._start()
        return await self.host.stage_checkpoint(sync_id, version, path)

    async def commit(self, sync_id: str, version: int) -> int:
        await self._start()
        return await self.host.commit(sync_id, version)

    async def abort(self, sync_id: str, version: int) -> bool:
        return await self.host.abort(sync_id, version)

    async def catch_up(self) -> int:
        return await self.host.catch_up()

    # -- status, lifecycle --------------------------------------------------------------------

    async def status(self) -> WorkerStatus:
        await self._start()
        return WorkerStatus(
            **self.host.engine.status(), index=self.index, starts=self.starts, restarts=self.starts - 1, pid=os.getpid()
        )

    async def shutdown(self) -> None:
        self.host.shutdown()


async def _fetch(ref: ObjectRef) -> Any:
    """A bucket from the object store (zero-copy)."""
    return await ref


async def _put(buffer: Any) -> ObjectRef:
    """A relay copy of a bucket in this node's object store, owned by this worker (so it is
    dropped with the worker); the copy runs off the event loop."""
    return await asyncio.to_thread(ray.put, buffer)


async def _relay_copy_from(parent: Any, sync_id: str, index: int) -> ObjectRef:
    """The ref of a parent worker's relay copy of a bucket (its `relay_copy` call)."""
    (ref,) = await parent.relay_copy.remote(sync_id, index)
    return ref
