"""The coordinator's half of the weight sync: flatten, check, pack, put, stage, publish, commit.

    flatten  the params to {engine path: array} (nnx.State, nested or flat dicts, HF names)
    check    their spec against the fleet's; a mismatch raises before any byte moves
    fetch    jax arrays to host numpy (all leaves in one device_get)
    pack+put leaves into buckets of at most bucket_bytes, cast to the fleet dtype, count
             NaN/Inf (NonFiniteWeightsError: the update is refused, workers abort) and
             checksum each, and put each bucket into the object store once. Every live
             worker is already staging (phase 1) and gets each bucket's ref and checksum as
             soon as it is in, so workers verify and place bucket k while bucket k+1 is
             packed and put
             (pipelined_sync=False: pack all, put all, then stage: phases pack, put)
    stage    wait for every worker's stage; any failure or timeout -> abort on all, raise
             SyncError naming each failing worker and why; the fleet keeps its version
    publish  the update to the registry: the commit point (a restarted worker loads it)
    commit   on every worker (phase 2)

An HF directory or repo id skips fetch/pack/put: every worker stages the checkpoint itself.
Each phase is logged as one JSON line on the "rollout.sync" logger, and kept in SyncRecord.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import ray

from rollout.errors import SyncError
from rollout.relay import RelayPlanner
from rollout.weights.buckets import BucketLayout, Manifest, Packer, plan_buckets
from rollout.weights.hf_names import IGNORED, hf_to_path
from rollout.weights.spec import ParamSpec, SpecMismatchError, flatten_params, spec_of_leaves

log = logging.getLogger("rollout.sync")


@dataclasses.dataclass
class SyncRecord:
    """One sync attempt, as status() reports it."""

    version: int
    source: str  # "pytree" | "checkpoint"
    ok: bool = False
    nbytes: int = 0
    leaves: int = 0
    buckets: int = 0
    workers: tuple[int, ...] = ()
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # phase -> seconds
    worker_seconds: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    error: str | None = None
    started_at: float = dataclasses.field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total_s"] = round(sum(self.seconds.values()), 6)
        return out


@dataclasses.dataclass(frozen=True)
class Fleet:
    """What the sync needs from the service (kept narrow so the sync is easy to follow)."""

    handles: Sequence[Any]  # worker actor handles, by index
    registry: Any  # UpdateRegistry actor handle
    spec: ParamSpec  # the engines' parameter spec
    live_workers: Callable[[], list[int]]  # workers that take part (up)
    worker_down: Callable[[int, BaseException], None]  # report a worker that failed


def is_checkpoint_ref(params: Any) -> bool:
    return isinstance(params, (str, os.PathLike))


class WeightSync:
    """Runs syncs one at a time (the caller holds the service's sync lock)."""

    def __init__(
        self,
        fleet: Fleet,
        bucket_bytes: int,
        timeout_s: float,
        tie_word_embeddings: bool,
        checksum: str = "sum64",
        pipelined: bool = True,
        relay_fanout: int = 2,
    ):
        self.fleet = fleet
        self.relay_fanout = relay_fanout  # 0: every worker fetches from the coordinator (rollout/relay.py)
        self.pipelined = pipelined
        self.bucket_bytes = bucket_bytes
        self.checksum = checksum
        self.timeout_s = timeout_s
        self.tie_word_embeddings = tie_word_embeddings
        self.layout: BucketLayout = plan_buckets(fleet.spec, bucket_bytes)
        self._buffers: list[np.ndarray] | None = None  # see pack_buffers
        self.last_update: dict[str, Any] | None = None  # keeps the committed buckets alive
        self._died: set[int] = set()  # workers whose process died during the last stage phase

    def sync(self, params: Any, version: int, record: SyncRecord) -> int:
        """Sync `params` as `version` (= the fleet's version + 1). Raises SpecMismatchError
        before any transfer, SyncError after an aborted stage phase."""
        workers = self.fleet.live_workers()
        if not workers:
            raise SyncError(version, version - 1, {-1: "no live worker to sync (all down or dead)"})
        record.workers = tuple(workers)
        sync_id = uuid.uuid4().hex[:12]
        if is_checkpoint_ref(params):
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
            self.last_update = update
        with _phase(record, "commit"):
            self._commit_all(workers, sync_id, version, record)
        record.ok = True
        return version

    # -- phase 1 ----------------------------------------------------------------------------------

    def _stage_pytree(self, params: Any, version: int, record: SyncRecord, workers: list[int], sync_id: str):
        record.source = "pytree"
        record.nbytes = self.layout.nbytes
        record.leaves = len(self.layout.slots)
        planner = RelayPlanner(self.fleet.handles, workers, self.relay_fanout)  # workers' nodes, asked now
        with _phase(record, "flatten"):
            flat = flatten_params(params)
        with _phase(record, "check"):
            self.fleet.spec.check(ParamSpec.of(flat))  # before any transfer
            flat = {path: flat[path] for path in self.fleet.spec.paths}
        with _phase(record, "fetch"):
            host = to_host(flat)
        handles = [self.fleet.handles[i] for i in workers]
        relay = planner.roles()  # who fetches from whom (rollout/relay.py)
        packer = Packer(host, self.layout, self.pack_buffers(), checksum_algo=self.checksum,
                        threads=min(4, os.cpu_count() or 1))
        refs: list[Any] = []
        buckets = range(len(self.layout.bucket_nbytes))
        with packer:
            if self.pipelined:
                # Workers start staging now on a manifest without checksums; each bucket is put
                # as soon as it is packed and sent with its checksum, so workers verify and
                # place bucket k while bucket k+1 is packed and put.
                streaming = self._manifest(version, (None,) * len(buckets))
                calls = {h.stage.remote(sync_id, streaming, None, relay[i]): i for h, i in zip(handles, workers)}
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
                manifest = self._manifest(version, tuple(sums))
            else:
                with _phase(record, "pack"):
                    sums = [packer.pack_bucket(index) for index in buckets]
                manifest = self._manifest(version, tuple(sums))
                with _phase(record, "put"):
                    refs = [ray.put(packer.buffers[index]) for index in buckets]
                calls = {h.stage.remote(sync_id, manifest, list(refs), relay[i]): i for h, i in zip(handles, workers)}
        del host, flat
        record.buckets = len(refs)
        return {"version": version, "kind": "buckets", "manifest": manifest, "refs": refs}, calls

    def _manifest(self, version: int, sums: tuple[int | None, ...]) -> bytes:
        """The manifest of a packed update (`finite`: the packer counted every value)."""
        return Manifest(version, self.layout, sums, self.checksum, finite=True).to_bytes()

    def pack_buffers(self) -> list[np.ndarray]:
        """A uint8 buffer per bucket to pack it into, kept from sync to sync (memory touched once
        is fast to write again). Pipelined, bucket k+2 is packed only after bucket k was put, so
        the buckets take turns in two buffers of the largest bucket's size: the coordinator
        holds 2 x bucket_bytes, not a copy of the model. Otherwise every bucket has its own."""
        if self._buffers is None:
            sizes = self.layout.bucket_nbytes
            if self.pipelined:
                ring = [np.empty(max(sizes, default=0), np.uint8) for _ in range(min(2, len(sizes)))]
                self._buffers = [ring[k % len(ring)][:n] for k, n in enumerate(sizes)]
            else:
                self._buffers = [np.empty(n, np.uint8) for n in sizes]
        return self._buffers

    def _stage_checkpoint(self, params: Any, version: int, record: SyncRecord, workers: list[int], sync_id: str):
        record.source = "checkpoint"
        record.nbytes = self.fleet.spec.nbytes
        record.leaves = len(self.fleet.spec.leaves)
        path = str(params)
        with _phase(record, "check"):
            if Path(path).expanduser().is_dir():
                self.fleet.spec.check(checkpoint_spec(Path(path).expanduser(), self.tie_word_embeddings))
                path = str(Path(path).expanduser().resolve())
        calls = {self.fleet.handles[i].stage_checkpoint.remote(sync_id, version, path): i for i in workers}
        return {"version": version, "kind": "checkpoint", "path": path}, calls

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
            except Exception as err:  # noqa: BLE001
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
    out = {p: a for p, a in flat.items()}
    if on_device:
        import jax

        for path, array in zip(on_device, jax.device_get([flat[p] for p in on_device])):
            out[path] = array
    return {p: np.asarray(a) for p, a in out.items()}


def checkpoint_spec(directory: Path, tie_word_embeddings: bool) -> ParamSpec:
    """The engine-path spec of an HF checkpoint directory, from safetensors headers alone."""
    from safetensors import safe_open

    from rollout.weights.loader import safetensors_files

    leaves = []
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                target = hf_to_path(name)
                if target is None:
                    if IGNORED.search(name):
                        continue
                    raise SpecMismatchError(f"checkpoint tensor {name!r} maps to no parameter of this model")
                path, transpose = target
                if path == "lm_head.kernel" and tie_word_embeddings:
                    continue
                piece = f.get_slice(name)
                shape = tuple(piece.get_shape())
                leaves.append((path, shape[::-1] if transpose else shape, _safetensors_dtype(piece.get_dtype())))
    return spec_of_leaves(leaves)


def _safetensors_dtype(name: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(name, name.lower())


def describe_error(err: BaseException) -> str:
    """One line: the root cause of a Ray error (the worker's own exception when there is one)."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        if cause is not err:
            return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    if isinstance(err, ray.exceptions.ActorUnavailableError):
        return "the worker is unavailable (it died and is restarting)"
    if isinstance(err, ray.exceptions.RayActorError):
        return "the worker died (" + _first_line(str(err)) + ")"
    return f"{type(err).__name__}: {_first_line(str(err))}"


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text


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
            line["error"] = _first_line(str(exc))
        log.info(json.dumps(line))
