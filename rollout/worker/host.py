"""WorkerHost: everything a worker does around its engine, as a plain class (no Ray).

The Ray actor (`rollout.worker.actor.RolloutWorker`) is a thin shell around one WorkerHost; tests
drive a WorkerHost on an asyncio loop with a fake engine, real buckets and a real registry.

    host = WorkerHost(engine, fetch=..., latest_update=..., max_inflight_buckets=4, sync_timeout_s=600)
    await host.stage(sync_id, manifest_bytes, relay)  # phase 1; buckets come by feed, in any order
    await host.feed(sync_id, index, ref, checksum)   # may arrive before its stage call
    await host.commit(sync_id, version)              # phase 2 (or catch up if not staged here)
    await host.abort(sync_id, version)
    await host.catch_up()                            # load the registry's committed update
    await host.relay_copy(sync_id, index)            # a relay copy for a worker below this one
    await host.generate(ids, sampling, index, logprobs)           # one prompt's completions
    async for deltas in host.generate_stream(ids, sampling, index, logprobs): ...   # token by token
    await host.score(prompts, completions, temperature, routes, layers)   # teacher-forced logprobs

Generation awaits engine futures on the event loop, so many requests are in flight at once; a
request whose caller goes away (a cancelled call, a closed stream) is cancelled in the engine.
Scoring runs in the default executor (a forward pass of its own, beside serving); a backend
that cannot score is refused before its engine is called (`capabilities_of`). Weight work
(staging, committing, catching up) runs in a one-thread executor, so serving goes on while an
update is staged.

Receiving an update: `stage` starts `engine.stage` on a BucketInbox tree at once; each bucket
that `feed` delivers is fetched (at most `max_inflight_buckets` at a time) and its checksum
verified before any of its bytes is read; the engine validates and copies each leaf onto its
devices as its bucket arrives, so staging overlaps the transfer. Finiteness was counted by the
coordinator's packer (the manifest says so and the checksums prove these are its bytes), so the
engine skips that pass. Ray does not order an async actor's calls, so a feed may run before its
stage call: such buckets wait (by sync id) until the stage call picks them up.

Across nodes a sync's buckets are relayed (rollout.relay): the stage call's RelayRole says
whether this worker fetches each bucket from a parent worker's relay copy instead of the
coordinator's, and whether it puts relay copies of its own for the workers below. The
RelayPoint is the host's fetch path: every bucket, whichever copy it came from, is verified
against the coordinator's checksum; a relay copy that fails in any way is replaced by the
coordinator's; relay copies are dropped when the sync commits or aborts here.

Per sync attempt (`sync_id`): an attempt the coordinator aborted never ends up staged, even if
its staging was still running when the abort arrived, and its late calls are refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import numpy as np

from rollout.engine.backend import AdapterBackend, EngineBackend, ScoringBackend, capabilities_of
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.streaming import TokenDelta, stream_request
from rollout.engine.types import Completion, WeightSyncError
from rollout.protocol import (
    AdapterUpdate,
    BucketUpdate,
    CheckpointUpdate,
    CommittedUpdate,
    ObjectRef,
    RelayRole,
    StageReport,
)
from rollout.relay import RelayPoint
from rollout.weights.buckets import Manifest, unpack, verify, verify_bucket
from rollout.weights.inbox import BucketInbox
from rollout.weights.lora import LoraConfig, LoraFactors

log = logging.getLogger("rollout.worker.actor")

CATCH_UP = "catch-up"  # sync id of updates a worker applies on its own from the registry
EARLY_SYNCS = 4  # sync ids whose early buckets are kept while their stage call has not come


class SyncAbortedError(WeightSyncError):
    """The sync attempt was aborted by the coordinator before this worker finished staging."""


class RecentIds:
    """The last `limit` ids added: enough to recognise the late calls of an attempt that ended
    (they arrive within seconds), without growing over a long run.

    >>> ids = RecentIds(limit=2); ids.add("a"); ids.add("b"); ids.add("c")
    >>> "a" in ids, "c" in ids
    (False, True)
    """

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


class WorkerHost:
    """One engine and the worker's side of the two-phase sync (see module docstring).

    `fetch(ref)` resolves a bucket reference to its uint8 array (a Ray ObjectRef on a worker);
    `latest_update()` returns the registry's committed update, or None. For the relay
    (rollout.relay.RelayPoint): `put_relay_copy(buffer)` puts a bucket into this node's object
    store and returns its ref (None: this worker never relays); `relay_copy_from(parent_calls,
    sync_id, index)` asks a parent worker for its relay copy's ref (None: every bucket comes
    from the coordinator).
    """

    def __init__(
        self,
        engine: EngineBackend,
        *,
        fetch: Callable[[ObjectRef], Awaitable[np.ndarray]],
        latest_update: Callable[[], Awaitable[CommittedUpdate | None]],
        max_inflight_buckets: int = 4,
        sync_timeout_s: float = 600.0,
        put_relay_copy: Callable[[np.ndarray], Awaitable[ObjectRef]] | None = None,
        relay_copy_from: Callable[[Any, str, int], Awaitable[ObjectRef]] | None = None,
    ):
        self.engine = engine
        self.capabilities = capabilities_of(engine)  # what the worker's ready reply declares
        self._fetch = fetch
        self.relay = RelayPoint(fetch, put=put_relay_copy, copy_from=relay_copy_from, timeout_s=sync_timeout_s)
        self._latest_update = latest_update
        self._fetch_limit = asyncio.Semaphore(max_inflight_buckets)
        self._sync_timeout_s = sync_timeout_s
        self._inboxes: dict[str, BucketInbox] = {}  # syncs being staged
        self._early: collections.OrderedDict[str, list[tuple[int, ObjectRef, int | None]]] = (
            collections.OrderedDict()
        )
        self._finished = RecentIds()  # syncs staged or aborted here: their late feeds are refused
        self._aborted = RecentIds()  # syncs aborted here: their stages must not end up staged
        self._staged_sync: str | None = None  # the sync whose update the engine holds staged
        self._lock = threading.Lock()  # guards _staged_sync and _aborted against the weights thread
        self._weights_pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-weights")
        self._verify_pool = ThreadPoolExecutor(2, thread_name_prefix="rollout-verify")

    # -- serving ------------------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, prompt_index: int, return_logprobs: bool
    ) -> list[Completion]:
        """One prompt's completions; a cancelled call cancels the request in the engine."""
        future = self.engine.submit(prompt_ids, sampling, prompt_index=prompt_index, return_logprobs=return_logprobs)
        try:
            # shield: a cancelled call must not cancel the engine's future under its scheduler
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            self.engine.cancel(future)
            raise

    async def generate_stream(
        self, prompt_ids: list[int], sampling: SamplingParams, prompt_index: int, return_logprobs: bool
    ) -> AsyncGenerator[list[TokenDelta], None]:
        """One prompt's TokenDeltas as the engine accepts them (rollout.engine.streaming); closing
        or cancelling the iteration cancels the request at the engine's next step boundary.
        Engine errors (EngineClosedError) are raised after the deltas that came before them."""
        stream = stream_request(
            self.engine, prompt_ids, sampling, prompt_index=prompt_index, return_logprobs=return_logprobs
        )
        async with contextlib.aclosing(stream):  # closing it cancels the request
            async for deltas in stream:
                yield deltas

    async def score(
        self,
        prompts: list[list[int]],
        completions: list[list[int]],
        temperature: float = 1.0,
        routed_experts: list[Any] | None = None,
        return_hidden_states: list[int] | None = None,
    ) -> Any:
        """Per-token logprobs of each completion after its prompt on the engine's committed
        version (a rollout.scores.Scores); `routed_experts`: routes to replay (MoE models);
        `return_hidden_states`: layer indices whose residual stream to return too.
        FeatureUnavailableError, before the engine is called, if the backend cannot score,
        replay routes or return hidden states (`capabilities_of`: the same refusal as the
        coordinator's)."""
        self.capabilities.require("score")
        engine = cast(ScoringBackend, self.engine)  # capabilities_of checked that it scores
        score = functools.partial(engine.score, prompts, completions, temperature=temperature)
        if routed_experts is not None:
            self.capabilities.require("routed_experts")
            score = functools.partial(score, routed_experts=routed_experts)
        if return_hidden_states is not None:
            self.capabilities.require("hidden_states")
            score = functools.partial(score, return_hidden_states=return_hidden_states)
        return await asyncio.get_running_loop().run_in_executor(None, score)

    # -- phase 1 ------------------------------------------------------------------------------

    async def stage(self, sync_id: str, manifest_bytes: bytes, relay: RelayRole | None = None) -> StageReport:
        """Stage the update of `manifest_bytes`, whose buckets come by `feed` (before or after);
        `relay`: where this worker fetches them from and whether it relays them (rollout.relay)."""
        start = time.perf_counter()
        if sync_id in self._finished:
            raise SyncAbortedError(f"sync {sync_id} was aborted before this worker staged it")
        inbox = BucketInbox(Manifest.from_bytes(manifest_bytes), self._sync_timeout_s)
        self._inboxes[sync_id] = inbox  # before any await: feeds that run after this find it
        self.relay.begin(sync_id, relay)
        early = self._early.pop(sync_id, [])  # feeds that ran before this call
        receiving = [asyncio.ensure_future(self._receive(sync_id, inbox, *arrival)) for arrival in early]
        try:
            await self._in_weights_thread(self._stage_inbox, sync_id, inbox)
        except BaseException as err:
            inbox.fail(err)
            self.relay.fail(sync_id, f"staging failed here: {type(err).__name__}")  # children fall back now
            raise
        finally:
            self._inboxes.pop(sync_id, None)
            self._remember_finished(sync_id)
            inbox.release()  # the staged copies live on the devices; unpin the object store
            for task in receiving:  # after a failure some buckets may never come
                task.cancel()
        return StageReport(time.perf_counter() - start, inbox.wait_s, **self.relay.stats(sync_id))

    async def feed(self, sync_id: str, index: int, ref: ObjectRef, checksum: int | None = None) -> str | None:
        """Deliver bucket `index` of sync `sync_id`. None, or why it was refused (the stage call
        raises the same)."""
        inbox = self._inboxes.get(sync_id)
        if inbox is not None:
            return await self._receive(sync_id, inbox, index, ref, checksum)
        if sync_id in self._finished:
            return f"sync {sync_id} is no longer being staged here (aborted or finished)"
        self._early.setdefault(sync_id, []).append((index, ref, checksum))
        while len(self._early) > EARLY_SYNCS:  # a stage call that never came (its coordinator went away)
            self._early.popitem(last=False)
        return None

    async def stage_checkpoint(self, sync_id: str, version: int, path: str) -> StageReport:
        """Stage the weights of an HF checkpoint this worker reads itself."""
        start = time.perf_counter()
        await self._in_weights_thread(self._stage_checkpoint, sync_id, version, path)
        return StageReport(time.perf_counter() - start)

    async def relay_copy(self, sync_id: str, index: int) -> ObjectRef:
        """This worker's relay copy of bucket `index` of `sync_id`, once it is verified and put;
        raises rollout.relay.RelayClosed if it never will be (the child then fetches the
        coordinator's copy)."""
        return await self.relay.copy_for(sync_id, index)

    async def _receive(
        self, sync_id: str, inbox: BucketInbox, index: int, ref: ObjectRef, checksum: int | None = None
    ) -> str | None:
        loop = asyncio.get_running_loop()

        async def verified(buffer: np.ndarray) -> None:  # against the coordinator's checksum
            await loop.run_in_executor(self._verify_pool, verify_bucket, inbox.manifest, index, buffer, checksum)

        try:
            async with self._fetch_limit:
                # `ref` is the coordinator's copy; the relay may fetch a parent's instead
                buffer = await self.relay.fetch(sync_id, index, ref, verified)
            inbox.deliver(index, buffer)
            return None
        except Exception as err:  # noqa: BLE001 - the stage call reports it
            inbox.fail(err)
            return f"{type(err).__name__}: {err}"

    def _stage_inbox(self, sync_id: str, inbox: BucketInbox) -> None:
        self._check_not_aborted(sync_id)
        self._stage_leaves(inbox.manifest, inbox.tree())
        self._mark_staged(sync_id, inbox.manifest.version)

    def _stage_leaves(self, manifest: Manifest, leaves: Mapping[str, Any]) -> None:
        """Stage an update's leaves: a full update, or a LoRA adapter (the manifest's `adapter`
        entry) merged by the engine onto its resident base."""
        if manifest.adapter is None:
            self.engine.stage(manifest.version, leaves, finite_checked=manifest.finite)
            return
        self.capabilities.require("lora")  # the coordinator refused it already; a direct caller
        adapter = LoraFactors(leaves, LoraConfig.from_meta(manifest.adapter))
        cast(AdapterBackend, self.engine).stage_adapter(manifest.version, adapter, finite_checked=manifest.finite)

    def _stage_checkpoint(self, sync_id: str, version: int, path: str) -> None:
        self._check_not_aborted(sync_id)
        self.engine.stage_checkpoint(version, path)
        self._mark_staged(sync_id, version)

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

    def _remember_finished(self, sync_id: str) -> None:
        self._early.pop(sync_id, None)
        self._finished.add(sync_id)

    # -- phase 2, abort, catching up ----------------------------------------------------------

    async def commit(self, sync_id: str, version: int) -> int:
        """Commit what `sync_id` staged; a worker that does not hold it (it restarted after
        staging) catches up from the registry instead. Returns the version served."""
        self.relay.end(sync_id)  # every worker staged: no child needs this worker's copies
        if not await self._in_weights_thread(self._commit_staged, sync_id, version):
            await self.catch_up()
        return self.engine.version

    def _commit_staged(self, sync_id: str, version: int) -> bool:
        with self._lock:
            if self._staged_sync == sync_id and self.engine.staged_version == version:
                self.engine.commit(version)
                self._staged_sync = None
                return True
        return self.engine.version >= version

    async def abort(self, sync_id: str, version: int) -> bool:
        """Drop what `sync_id` staged, or make its staging end unstaged. True if dropped now."""
        self._remember_finished(sync_id)
        self.relay.end(sync_id)
        inbox = self._inboxes.get(sync_id)
        if inbox is not None:  # wake a staging thread that waits for buckets
            inbox.fail(SyncAbortedError(f"sync {sync_id} was aborted by the coordinator"))
        with self._lock:
            self._aborted.add(sync_id)
            if self._staged_sync == sync_id:
                self._staged_sync = None
                return self.engine.abort(version)
        return False

    async def catch_up(self) -> int:
        """Load the registry's last committed update if it is newer than what the engine serves;
        waits until it serves. Returns the version served."""
        update = await self._latest_update()
        if update is None or update.version <= self.engine.version:
            return self.engine.version
        # an adapter merges onto the full update before it: apply that first if this engine has
        # an older base (it restarted, or missed that sync while down)
        base = update.base if isinstance(update, AdapterUpdate) else None
        if base is not None and base.version > getattr(self.engine, "base_version", 0):
            await self._apply_update(base)
        return await self._apply_update(update)

    async def _apply_update(self, update: CommittedUpdate) -> int:
        buffers: list[np.ndarray] = []
        if isinstance(update, (BucketUpdate, AdapterUpdate)):
            buffers = list(await asyncio.gather(*(self._fetch(ref) for ref in update.refs)))
        return await self._in_weights_thread(self._apply, update, buffers)

    def _apply(self, update: CommittedUpdate, buffers: Sequence[np.ndarray]) -> int:
        version = update.version
        if version <= self.engine.version:
            return self.engine.version
        if isinstance(update, CheckpointUpdate):
            self.engine.stage_checkpoint(version, update.path)
        else:
            manifest = Manifest.from_bytes(update.manifest)
            verify(manifest, buffers)
            self._stage_leaves(manifest, unpack(manifest, buffers))
        with self._lock:
            self._staged_sync = CATCH_UP
        self.engine.commit(version, wait=True, timeout=600)
        with self._lock:
            self._staged_sync = None
        log.info("worker caught up with committed version %d", version)
        return version

    # -- lifecycle ----------------------------------------------------------------------------

    async def _in_weights_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._weights_pool, fn, *args)

    def shutdown(self) -> None:
        """Stop the engine (its requests fail with EngineClosedError) and the host's threads."""
        self.engine.shutdown()
        self._weights_pool.shutdown(wait=False, cancel_futures=True)
        self._verify_pool.shutdown(wait=False, cancel_futures=True)
