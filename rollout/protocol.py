"""The sync contract: every message that crosses between the coordinator, the registry and the
workers, declared once.

    CommittedUpdate  the last committed update (BucketUpdate | CheckpointUpdate | AdapterUpdate): written by the
                     coordinator at the commit point, kept by the registry, loaded by a worker
                     that (re)starts
    RelayRole        a worker's part in one sync's bucket relay (rollout.relay), sent with stage
    StageReport      what a worker's stage call returns (kept per worker in status()'s syncs)
    WorkerReady      what a worker's `ready` probe returns
    WorkerStatus     what a worker's `status` returns: its engine's EngineStatus plus who it is
    WorkerCalls      the worker's remote calls (a Ray actor's methods, called with `.remote`)

Update data stays plain: a manifest is msgpack bytes parsed with `Manifest.from_bytes`, buckets
are raw uint8 arrays in the object store, referenced here by their ObjectRefs (inside a
dataclass, so Ray passes them unresolved and whoever holds the update keeps them alive).
No jax, no Ray import: the driver loads this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from rollout.engine.backend import FULL_CAPABILITIES, EngineCapabilities, EngineStatus
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.streaming import TokenDelta
from rollout.engine.types import Completion
from rollout.weights.spec import ParamSpec

ObjectRef = Any  # a Ray ObjectRef of one bucket (1-D uint8 array); opaque here


@dataclasses.dataclass(frozen=True)
class BucketUpdate:
    """An update packed into buckets: its msgpack manifest and one object ref per bucket."""

    version: int
    manifest: bytes
    refs: tuple[ObjectRef, ...]


@dataclasses.dataclass(frozen=True)
class CheckpointUpdate:
    """An update every worker reads from an HF checkpoint (a path on every node, or a repo id)."""

    version: int
    path: str


@dataclasses.dataclass(frozen=True)
class AdapterUpdate:
    """A LoRA adapter packed into buckets (its manifest has an `adapter` entry: rank, alpha,
    rsLoRA), and the full update it is merged onto (`base`: the last full update committed
    before it; None: the weights the workers loaded at start). A worker that catches up
    applies `base` first if its own base is older, then the adapter."""

    version: int
    manifest: bytes
    refs: tuple[ObjectRef, ...]
    base: BucketUpdate | CheckpointUpdate | None = None


CommittedUpdate = BucketUpdate | CheckpointUpdate | AdapterUpdate


@dataclasses.dataclass(frozen=True)
class RelayRole:
    """A worker's part in one sync's relay (rollout.relay): fetch each bucket from worker
    `parent`'s relay copy (None: from the coordinator's object store) and/or put relay copies of
    its own for the workers below it. Every bucket is verified against the coordinator's
    checksum whichever copy it came from; a relay that fails falls back to the coordinator's.

    `parent_calls` is the parent's actor handle (WorkerCalls), set by the coordinator when it
    sends the role; the plan itself (rollout.relay.plan_relay) names workers by index."""

    parent: int | None = None
    relays: bool = False
    parent_calls: Any = None


@dataclasses.dataclass(frozen=True)
class StageReport:
    """Seconds a worker spent in one stage call, and of those, waiting for buckets to arrive;
    with a relay role, where its buckets came from and how many relay copies it put."""

    stage_s: float
    waited_for_buckets_s: float = 0.0
    relayed_buckets: int = 0  # fetched from the parent worker's relay copies
    relay_fallbacks: int = 0  # fetched from the coordinator after the parent's copy failed
    relay_copies: int = 0  # relay copies put here for the workers below


@dataclasses.dataclass(frozen=True)
class WorkerReady:
    """A worker's answer to the coordinator's `ready` probe."""

    index: int
    version: int  # committed weight version
    starts: int  # times this worker has been started (1 + restarts)
    pid: int
    node_ip: str
    devices: int
    # what its engine backend cannot do (the coordinator refuses those requests up front)
    capabilities: EngineCapabilities = FULL_CAPABILITIES


class WorkerStatus(EngineStatus):
    """A worker's status: its engine's (EngineStatus) plus who it is. A plain dict on the wire;
    `RolloutService.status()` merges it into each worker's entry."""

    index: int
    starts: int
    restarts: int
    pid: int


class WorkerCalls(Protocol):
    """The remote calls of a worker actor (`rollout.worker.actor.RolloutWorker`), as the coordinator
    makes them with `handle.<name>.remote(...)`. Ray does not order an async actor's calls:
    a `feed` may arrive before the `stage` it belongs to."""

    async def ready(self) -> WorkerReady:
        """Started and caught up with the fleet's committed version (restarts the process if
        its engine died)."""

    async def spec(self) -> ParamSpec:
        """The parameter spec every update must match."""

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, prompt_index: int, return_logprobs: bool
    ) -> list[Completion]:
        """One prompt's n completions."""

    def generate_stream(
        self, prompt_ids: list[int], sampling: SamplingParams, prompt_index: int, return_logprobs: bool
    ) -> AsyncIterator[list[TokenDelta]]:
        """The same request token by token (a Ray streaming generator: call it with
        `.options(num_returns="streaming")`); cancelling the stream cancels the request."""

    async def score(
        self,
        prompts: list[list[int]],
        completions: list[list[int]],
        temperature: float = 1.0,
        routed_experts: list[Any] | None = None,
        return_hidden_states: list[int] | None = None,
    ) -> Any:
        """Per-token logprobs of each completion after its prompt on the committed version (a
        rollout.scores.Scores), with `routed_experts` (one int16 (prompt + completion - 1, MoE
        layers, top_k) array per pair) replayed when given, and with `return_hidden_states`
        (layer indices, checked by the coordinator) the residual stream at those layers in
        Scores.hidden_states; refused by a backend without scoring, routing replay or hidden
        states (see its capabilities)."""

    async def node_id(self) -> str:
        """The Ray node this worker runs on (the coordinator plans a sync's relay by node)."""

    async def stage(self, sync_id: str, manifest: bytes, relay: RelayRole | None = None) -> StageReport:
        """Phase 1 of sync attempt `sync_id`: stage the update of `manifest` as its buckets come
        by `feed`; serving goes on meanwhile. `relay`: this worker's part in the sync's relay
        (None: fetch every bucket from the coordinator, relay nothing)."""

    async def feed(
        self, sync_id: str, index: int, bucket_ref: Sequence[ObjectRef], checksum: int | None = None
    ) -> str | None:
        """Deliver bucket `index` (its ref inside a list, so Ray passes it unresolved) with its
        checksum when the manifest has none. None, or why the bucket was refused."""

    async def relay_copy(self, sync_id: str, index: int) -> list[ObjectRef]:
        """This worker's relay copy of bucket `index` of `sync_id` (its ref inside a list, so
        Ray passes it unresolved), once fetched, verified and put here. Raises
        rollout.relay.RelayClosed if it never will be: the asking worker then fetches the
        coordinator's copy."""

    async def stage_checkpoint(self, sync_id: str, version: int, path: str) -> StageReport:
        """Phase 1 from an HF checkpoint the worker reads itself."""

    async def commit(self, sync_id: str, version: int) -> int:
        """Phase 2: swap the staged update in (or catch up from the registry); the version served."""

    async def abort(self, sync_id: str, version: int) -> bool:
        """Drop what `sync_id` staged (or stop it staging); True if something was dropped."""

    async def catch_up(self) -> int:
        """Load the registry's committed update if newer; the version served."""

    async def status(self) -> WorkerStatus:
        """Health and counters."""

    async def shutdown(self) -> None:
        """Stop serving; running requests fail with EngineClosedError."""
