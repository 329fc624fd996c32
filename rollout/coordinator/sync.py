"""The coordinator's half of the weight sync: flatten, check, pack, put, stage, publish, commit.

    flatten  the params to {engine path: array} (nnx.State, nested or flat dicts, HF names)
    check    their spec against the fleet's; a mismatch raises before any byte moves
    fetch    jax arrays to host numpy (all leaves in one device_get)
    pack+put leaves into buckets of at most bucket_bytes, cast to the fleet dtype, count
             NaN/Inf (NonFiniteWeightsError: the update is refused, workers abort) and
             checksum each, and put each bucket into the object store once. Every live
             worker is already staging (phase 1) and gets each bucket's ref and checksum as
             soon as it is in, so workers verify and place bucket k while bucket k+1 is
             packed and put. Across nodes the buckets are relayed (rollout.relay): the
             workers' nodes, asked when the sync starts, give each worker a RelayRole with
             its stage call, so the coordinator's node sends about one model per sync
    stage    wait for every worker's stage; any failure or timeout -> abort on all, raise
             SyncError naming each failing worker and why; the fleet keeps its version
    publish  the update to the registry: the commit point (a restarted worker loads it)
    commit   on every worker (phase 2)

An HF directory or repo id skips fetch/pack/put: every worker stages the checkpoint itself.
A LoRA adapter (rollout.weights.lora) is checked against the base, packed into buckets of its
own layout and staged by every worker the same two-phase way (an AdapterUpdate): only the
adapter's factors cross the object store. `update_source` tells the kinds of update apart, once
per sync.
Each phase is logged as one JSON line on the "rollout.coordinator.sync" logger, and kept in SyncRecord.
What crosses to the workers and the registry is declared in rollout.protocol (the workers'
calls: WorkerCalls; the published update: CommittedUpdate).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray

from rollout.coordinator.fleet_view import FleetView
from rollout.errors import SyncError, describe_error, first_line
from rollout.protocol import AdapterUpdate, BucketUpdate, CheckpointUpdate, CommittedUpdate, RelayRole, StageReport
from rollout.relay import plan_relay
from rollout.weights.buckets import DEFAULT_CHECKSUM, BucketLayout, Manifest, Packer, pack, plan_buckets
from rollout.weights.loader import checkpoint_spec
from rollout.weights.lora import LoraAdapter, factors_spec, is_adapter_dir
from rollout.weights.spec import ParamSpec, flatten_params

log = logging.getLogger("rollout.coordinator.sync")


UpdateSource = Literal["checkpoint", "pytree", "lora"]


def update_source(params: Any) -> UpdateSource:
    """How an update reaches the workers, decided by its type: "lora" for a LoraAdapter or a PEFT
    adapter directory (only its factors are sent; merged onto each worker's base), "checkpoint"
    for an HF directory or repo id (a str or os.PathLike: every worker loads it itself), "pytree"
    for parameters in the coordinator's memory (packed into buckets and sent).

    >>> update_source("Qwen/Qwen3-0.6B"), update_source({"embed.embedding": [0.0]})
    ('checkpoint', 'pytree')
    """
    if isinstance(params, LoraAdapter) or is_adapter_dir(params):
        return "lora"
    return "checkpoint" if isinstance(params, (str, os.PathLike)) else "pytree"


@dataclasses.dataclass
class SyncRecord:
    """One sync attempt, as status() reports it."""

    version: int
    source: UpdateSource  # update_source(params): decides how the sync runs
    ok: bool = False
    nbytes: int = 0
    leaves: int = 0
    buckets: int = 0
    workers: tuple[int, ...] = ()
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # phase -> seconds
    worker_seconds: dict[int, StageReport] = dataclasses.field(default_factory=dict)
    error: str | None = None
    started_at: float = dataclasses.field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total_s"] = round(sum(self.seconds.values()), 6)
        return out


class WeightSync:
    """Runs syncs one at a time (the caller holds the service's sync lock)."""

    def __init__(
        self,
        fleet: FleetView,
        bucket_bytes: int,
        timeout_s: float,
        checksum: str = DEFAULT_CHECKSUM,
        relay_fanout: int = 0,
    ):
        self.fleet = fleet
        self.relay_fanout = relay_fanout  # FleetConfig.relay_fanout; 0: every worker fetches from the coordinator
        self.bucket_bytes = bucket_bytes
        self.checksum = checksum
        self.timeout_s = timeout_s
        self.layout: BucketLayout = plan_buckets(fleet.spec, bucket_bytes)
        self._buffers: list[np.ndarray] | None = None  # see pack_buffers
        self.committed: CommittedUpdate | None = None  # keeps the committed buckets alive
        # the last full update committed (None: the weights the workers loaded): the base every
        # adapter is merged onto, sent with each AdapterUpdate for workers that catch up
        self.base: BucketUpdate | CheckpointUpdate | None = None
        self._died: set[int] = set()  # workers whose process died during the last stage phase

    def sync(self, params: Any, version: int, record: SyncRecord) -> int:
        """Sync `params` as `version` (= the fleet's version + 1), as `record.source` says
        (update_source(params)). Raises SpecMismatchError before any transfer, SyncError after an
        aborted stage phase."""
        workers = self.fleet.live_workers()
        if not workers:
            raise SyncError(version, version - 1, {-1: "no live worker to sync (all down or dead)"})
        record.workers = tuple(workers)
        sync_id = uuid.uuid4().hex[:12]
        if record.source == "lora":
            update, calls = self._stage_adapter(params, version, record, workers, sync_id)
        elif record.source == "checkpoint":
            update, calls = self._stage_checkpoint(params, version, record, workers, sync_id)
        else:
            update, calls = self._stage_pytree(params, version, record, workers, sync_id)
        with _phase(record, "stage"):
            failures = self._wait_staged(calls, record)
        if failures:
            with _phase(record, "abort"):  # a worker whose process died holds nothing staged
                self._abort_all([i for i in workers if i not in self._died], sync_id, version)
            raise SyncError(version, version - 1, failures)
        with _phase(record, "publish"):
            ray.get(self.fleet.registry.publish.remote(update), timeout=60)  # the commit point
            self.committed = update
            if not isinstance(update, AdapterUpdate):
                self.base = update  # what the next adapters merge onto
        with _phase(record, "commit"):
            self._commit_all(workers, sync_id, version, record)
        record.ok = True
        return version

    # -- phase 1 ----------------------------------------------------------------------------------

    def _stage_pytree(
        self, params: Any, version: int, record: SyncRecord, workers: list[int], sync_id: str
    ) -> tuple[CommittedUpdate, dict[Any, int]]:
        record.nbytes = self.layout.nbytes
        record.leaves = len(self.layout.slots)
        asked = self._ask_nodes(workers)  # answered while the tree is flattened and checked
        with _phase(record, "flatten"):
            flat = flatten_params(params, self.fleet.spec)
        with _phase(record, "check"):
            self.fleet.spec.check(ParamSpec.of(flat))  # before any transfer
            flat = {path: flat[path] for path in self.fleet.spec.paths}
        with _phase(record, "fetch"):
            host = to_host(flat)
        handles = [self.fleet.handles[i] for i in workers]
        relay = self._relay_roles(asked, workers)
        packer = Packer(host, self.layout, self.pack_buffers(), checksum_algo=self.checksum,
                        threads=min(4, os.cpu_count() or 1))
        refs: list[Any] = []
        buckets = range(len(self.layout.bucket_nbytes))
        with packer:
            # Workers start staging now on a manifest without checksums; each bucket is put as
            # soon as it is packed and sent with its checksum, so workers verify and place
            # bucket k while bucket k+1 is packed and put.
            streaming = self._manifest(version, (None,) * len(buckets))
            calls = {h.stage.remote(sync_id, streaming, relay[i]): i for h, i in zip(handles, workers)}
            sums: list[int] = []

            def put_and_feed(index: int) -> None:
                refs.append(ray.put(packer.buffers[index]))
                for handle in handles:  # the ref inside a list: Ray passes it unresolved
                    handle.feed.remote(sync_id, index, [refs[-1]], sums[index])

            try:
                with _phase(record, "pack+put"), ThreadPoolExecutor(1, thread_name_prefix="rollout-put") as putter:
                    # bucket k is put while bucket k+1 is packed; bucket k+2 reuses bucket k's
                    # buffer (pack_buffers), so its put must be over first
                    sent = None
                    for index in buckets:
                        sums.append(packer.pack_bucket(index))
                        if sent is not None:
                            sent.result()
                        sent = putter.submit(put_and_feed, index)
                    if sent is not None:
                        sent.result()
            except BaseException:
                self._abort_all(workers, sync_id, version)  # they wait for buckets that never come
                raise
        del host, flat
        record.buckets = len(refs)
        return BucketUpdate(version, self._manifest(version, tuple(sums)), tuple(refs)), calls

    def _ask_nodes(self, workers: list[int]) -> dict[Any, int]:
        """Each worker's node, asked (not awaited): {ref of the answer: worker}. Nothing to ask
        with the relay off or a single worker."""
        if self.relay_fanout < 1 or len(workers) < 2:
            return {}
        return {self.fleet.handles[w].node_id.remote(): w for w in workers}

    def _relay_roles(self, asked: dict[Any, int], workers: list[int], timeout_s: float = 10.0) -> dict[int, RelayRole | None]:
        """Each worker's RelayRole (rollout.relay.plan_relay), its parent's handle attached; a
        worker whose node did not answer fetches from the coordinator and relays nothing."""
        if not asked:
            return dict.fromkeys(workers)
        nodes: dict[int, str | None] = dict.fromkeys(workers)
        done, _ = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
        for ref in done:
            try:
                nodes[asked[ref]] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a worker that is down: its stage call will say
                log.info(json.dumps({"event": "relay_node_unknown", "worker": asked[ref], "error": describe_error(err)}))
        roles = plan_relay(nodes, ray.get_runtime_context().get_node_id(), self.relay_fanout)
        if any(role.parent is not None for role in roles.values()):
            log.info(json.dumps({"event": "relay_plan", "parents": {w: r.parent for w, r in roles.items()}}))
        out: dict[int, RelayRole | None] = {}
        for worker, role in roles.items():
            if role.parent is None and not role.relays:
                out[worker] = None  # reads the coordinator's copy, relays nothing
            else:
                parent = None if role.parent is None else self.fleet.handles[role.parent]
                out[worker] = dataclasses.replace(role, parent_calls=parent)
        return out

    def _manifest(self, version: int, sums: tuple[int | None, ...]) -> bytes:
        """The manifest of a packed update (`finite`: the packer counted every value)."""
        return Manifest(version, self.layout, sums, self.checksum, finite=True).to_bytes()

    def pack_buffers(self) -> list[np.ndarray]:
        """A uint8 buffer per bucket to pack it into, kept from sync to sync (memory touched once
        is fast to write again). Bucket k+2 is packed only after bucket k was put, so the
        buckets take turns in two buffers of the largest bucket's size: the coordinator holds
        2 x bucket_bytes, not a copy of the model."""
        if self._buffers is None:
            sizes = self.layout.bucket_nbytes
            ring = [np.empty(max(sizes, default=0), np.uint8) for _ in range(min(2, len(sizes)))]
            self._buffers = [ring[k % len(ring)][:n] for k, n in enumerate(sizes)]
        return self._buffers

    def _stage_adapter(
        self, adapter: LoraAdapter, version: int, record: SyncRecord, workers: list[int], sync_id: str
    ) -> tuple[CommittedUpdate, dict[Any, int]]:
        """A LoRA adapter: only its factors cross the object store (a few MiB). Checked against
        the base (rollout.weights.lora) before any byte moves, packed whole (it is small), then
        every worker stages it with its manifest's checksums; no relay."""
        record.source = "lora"
        with _phase(record, "check"):
            factors = LoraAdapter(to_host(adapter.tensors), adapter.config).factors(self.fleet.spec)
        layout = plan_buckets(factors_spec(factors), self.bucket_bytes)
        record.nbytes, record.leaves = layout.nbytes, len(layout.slots)
        with _phase(record, "pack+put"):
            packed = pack(factors, layout, version, checksum_algo=self.checksum, adapter=adapter.config.to_meta())
            refs = tuple(ray.put(buffer) for buffer in packed.buffers)
        record.buckets = len(refs)
        manifest = packed.manifest.to_bytes()
        calls = {self.fleet.handles[i].stage.remote(sync_id, manifest, None): i for i in workers}
        for i in workers:
            for index, ref in enumerate(refs):  # the ref inside a list: Ray passes it unresolved
                self.fleet.handles[i].feed.remote(sync_id, index, [ref], None)
        return AdapterUpdate(version, manifest, refs, self.base), calls

    def _stage_checkpoint(
        self, params: Any, version: int, record: SyncRecord, workers: list[int], sync_id: str
    ) -> tuple[CommittedUpdate, dict[Any, int]]:
        record.nbytes = self.fleet.spec.nbytes
        record.leaves = len(self.fleet.spec.leaves)
        path = str(params)
        with _phase(record, "check"):
            if Path(path).expanduser().is_dir():
                self.fleet.spec.check(checkpoint_spec(Path(path).expanduser(), self.fleet.spec))
                path = str(Path(path).expanduser().resolve())
        calls = {self.fleet.handles[i].stage_checkpoint.remote(sync_id, version, path): i for i in workers}
        return CheckpointUpdate(version, path), calls

    def _wait_staged(self, calls: dict[Any, int], record: SyncRecord) -> dict[int, str]:
        done, pending = ray.wait(list(calls), num_returns=len(calls), timeout=self.timeout_s)
        failures: dict[int, str] = {}
        self._died = set()
        for ref in done:
            index = calls[ref]
            try:
                record.worker_seconds[index] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - every failure is reported by worker
                failures[index] = "stage failed: " + describe_error(err)
                if isinstance(err, ray.exceptions.RayActorError):
                    self._died.add(index)
                    self.fleet.worker_down(index, err)
        for ref in pending:
            failures[calls[ref]] = f"stage did not finish within sync_timeout_s={self.timeout_s:g}s"
        return failures

    def _abort_all(self, workers: list[int], sync_id: str, version: int) -> None:
        calls = [self.fleet.handles[i].abort.remote(sync_id, version) for i in workers]
        ray.wait(calls, num_returns=len(calls), timeout=30)

    def _commit_all(self, workers: list[int], sync_id: str, version: int, record: SyncRecord) -> None:
        calls = {self.fleet.handles[i].commit.remote(sync_id, version): i for i in workers}
        done, pending = ray.wait(list(calls), num_returns=len(calls), timeout=self.timeout_s)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - the update is published; see below
                # The update is published: this worker catches up when it is back (or restarts).
                log.warning(json.dumps({"event": "commit_failed", "version": version, "worker": calls[ref],
                                        "error": describe_error(err)}))
                self.fleet.worker_down(calls[ref], err)
        for ref in pending:
            log.warning(json.dumps({"event": "commit_timeout", "version": version, "worker": calls[ref]}))
            self.fleet.worker_down(calls[ref], TimeoutError("commit timed out"))


def to_host(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Leaves as host numpy arrays; jax arrays are fetched together (transfers overlap)."""
    on_device = [p for p, a in flat.items() if type(a).__module__.startswith(("jax", "jaxlib"))]
    out = dict(flat)
    if on_device:
        import jax

        out.update(zip(on_device, jax.device_get([flat[p] for p in on_device])))
    return {p: np.asarray(a) for p, a in out.items()}


class _phase:
    """Time one phase into `record.seconds` and log it as one JSON line."""

    def __init__(self, record: SyncRecord, name: str):
        self.record, self.name = record, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, exc_type, exc, tb) -> None:
        seconds = time.perf_counter() - self.start
        self.record.seconds[self.name] = round(seconds, 6)
        line = {"event": "sync_phase", "version": self.record.version, "phase": self.name,
                "seconds": round(seconds, 6), "bytes": self.record.nbytes, "ok": exc is None}
        if exc is not None:
            line["error"] = first_line(str(exc))
        log.info(json.dumps(line))
