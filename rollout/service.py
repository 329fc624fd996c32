"""RolloutService: the coordinator of a fleet of engine workers on Ray.

    svc = RolloutService("Qwen/Qwen3-0.6B", num_workers=2, devices_per_worker=4)
    version = svc.sync_weights(params)          # two-phase sync through the object store
    outs = svc.generate(prompts, SamplingParams(n=8, max_tokens=256))
    for c in svc.generate_async(prompts): ...   # as prompts finish (also `async for`)
    svc.status(); svc.shutdown()                # or `with RolloutService(...) as svc:`

The service validates prompts on the driver (model config + tokenizer; no jax here), routes each
prompt to the live worker with the least outstanding tokens, re-sends requests whose worker
died, and runs weight syncs one at a time while generation goes on from any number of threads.
A health thread probes workers that went down and lets them serve again once they have caught
up with the fleet's committed version.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
import weakref
from typing import Any, Sequence

import ray

from rollout.dispatch import Dispatch, GenerationStream
from rollout.engine.config import EngineConfig
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion
from rollout.errors import PlacementError, ServiceClosedError
from rollout.fleet import (
    FleetConfig,
    actor_options,
    check_placement,
    placement_message,
    resolve_accelerator,
)
from rollout.local_ray import start_local_ray
from rollout.models.config import ModelConfig
from rollout.prompts import Prompt, PromptValidator
from rollout.registry import UpdateRegistry
from rollout.routing import DEAD, DOWN, UP, Router
from rollout.sync import Fleet, SyncRecord, WeightSync, describe_error
from rollout.tokenizer import Tokenizer
from rollout.weights.loader import resolve_checkpoint
from rollout.weights.spec import ParamSpec
from rollout.worker import RolloutWorker

log = logging.getLogger("rollout.service")
_FLEET_FIELDS = {f.name for f in dataclasses.fields(FleetConfig)}
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
_PROBE_INTERVAL_S = 0.25


class RolloutService:
    """A fleet of `num_workers` engines, each on `devices_per_worker` devices.

    `model` is an HF directory or repo id (the driver reads its config and tokenizer to validate
    prompts; each worker loads the weights, or only shapes with load_format="dummy"). Further
    keyword options are the other fields of FleetConfig (engine: "native" or "sglang-jax",
    cpus_per_worker, max_restarts, checksum, env_vars, ...) and EngineConfig (max_prefill_batch, seed). `accelerator`: "cpu"
    (devices simulated), "tpu", "gpu" or "auto" (TPU if the cluster has TPUs, then GPU, else
    CPU). Ray is started locally (listening on loopback only) if it is not initialized; otherwise the service joins the
    running Ray (e.g. after `ray.init(address="auto")`); `ray_init_kwargs` go to that ray.init.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        num_workers: int = 2,
        devices_per_worker: int = 4,
        *,
        load_format: str = "auto",
        dtype: str = "float32",
        max_batch: int = 64,
        max_seq_len: int = 2048,
        swap_policy: str = "drain",
        accelerator: str = "auto",
        bucket_bytes: int = 256 << 20,
        sync_timeout_s: float = 600.0,
        decode_steps: int = 4,
        ray_init_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ):
        options.update(
            num_workers=num_workers, devices_per_worker=devices_per_worker, load_format=load_format, dtype=dtype,
            max_batch=max_batch, max_seq_len=max_seq_len, swap_policy=swap_policy, accelerator=accelerator,
            bucket_bytes=bucket_bytes, sync_timeout_s=sync_timeout_s, decode_steps=decode_steps,
        )
        unknown = sorted(set(options) - _FLEET_FIELDS - _ENGINE_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown}; expected fields of FleetConfig "
                f"{sorted(_FLEET_FIELDS)} or EngineConfig {sorted(_ENGINE_FIELDS)}"
            )
        self.fleet_config = FleetConfig(**{k: v for k, v in options.items() if k in _FLEET_FIELDS})
        self.engine_config = EngineConfig(**{k: v for k, v in options.items() if k in _ENGINE_FIELDS})
        self.checkpoint = resolve_checkpoint(model)
        self.model_config = ModelConfig.from_pretrained(self.checkpoint)
        self.tokenizer = Tokenizer.from_pretrained(self.checkpoint)
        self._validator = PromptValidator(self.model_config, self.tokenizer, self.engine_config)
        # Workers resolve repo ids on their own nodes; a local directory is passed as a path.
        self._model_ref = str(self.checkpoint) if os.path.isdir(os.path.expanduser(str(model))) else str(model)

        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            start_local_ray(**(ray_init_kwargs or {}))
        self.accelerator = resolve_accelerator(self.fleet_config.accelerator, ray.cluster_resources())
        self._closed = False
        self._handles: list[Any] = []
        self._registry: Any = None
        try:
            self._start_fleet()
        except BaseException:
            self._kill_actors()
            if self._owns_ray:
                ray.shutdown()
            raise
        self._router = Router(self.fleet_config.num_workers)
        self._version = 0  # committed on every live worker
        self._sync_lock = threading.Lock()
        self._history: collections.deque[SyncRecord] = collections.deque(maxlen=self.fleet_config.sync_history)
        self._sync = WeightSync(
            Fleet(self._handles, self._registry, self.spec, self._live_workers, self._worker_down),
            self.fleet_config.bucket_bytes,
            self.fleet_config.sync_timeout_s,
            self.model_config.tie_word_embeddings,
            self.fleet_config.checksum,
            self.fleet_config.pipelined_sync,
        )
        self._probes: dict[int, tuple[Any, str, float]] = {}  # worker -> (ref, kind, down since)
        self._stop = threading.Event()
        # A service dropped without shutdown() still releases its actors (and its own Ray); the
        # health thread holds it only weakly so that it can be collected.
        self._release = weakref.finalize(
            self, _release, self._stop, self._router, list(self._handles), self._registry, self._owns_ray
        )
        self._health = threading.Thread(
            target=_health_loop, args=(weakref.ref(self), self._stop), name="rollout-health", daemon=True
        )
        self._health.start()

    # -- startup ----------------------------------------------------------------------------------

    def _start_fleet(self) -> None:
        cfg = self.fleet_config
        if cfg.check_resources:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            check_placement(cfg, self.accelerator, nodes, ray.cluster_resources(), ray.available_resources())
        namespace = ray.get_runtime_context().namespace
        registry_name = f"rollout-registry-{uuid.uuid4().hex[:10]}"
        self._registry = ray.remote(UpdateRegistry).options(name=registry_name, num_cpus=0).remote()
        options = actor_options(cfg, self.accelerator, os.environ)
        worker_cls = ray.remote(RolloutWorker)
        self._handles = [
            worker_cls.options(**options).remote(
                i, self._model_ref, self.engine_config, cfg.devices_per_worker, registry_name, namespace,
                cfg.max_inflight_buckets, cfg.sync_timeout_s, engine=cfg.engine,
            )
            for i in range(cfg.num_workers)
        ]
        start = time.monotonic()
        probes = {h.ready.remote(): i for i, h in enumerate(self._handles)}
        done, pending = ray.wait(list(probes), num_returns=len(probes), timeout=cfg.ready_timeout_s)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - say which worker and why
                raise RuntimeError(f"worker {probes[ref]} failed to start: {describe_error(err)}") from err
        if pending:
            raise PlacementError(
                placement_message(
                    cfg, self.accelerator, ray.cluster_resources(), ray.available_resources(),
                    waited_s=time.monotonic() - start,
                )
                + f" Workers not ready: {sorted(probes[r] for r in pending)}."
            )
        self.spec: ParamSpec = ray.get(self._handles[0].spec.remote())
        log.info(json.dumps({"event": "fleet_ready", "workers": cfg.num_workers, "accelerator": self.accelerator,
                             "devices_per_worker": cfg.devices_per_worker, "seconds": round(time.monotonic() - start, 3)}))

    # -- weights ----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The weight version every live worker has committed (new requests get it or newer)."""
        return self._version

    @property
    def latest_version(self) -> int:
        """The newest version past its commit point (equal to `version` outside a sync's commit)."""
        update = self._sync.last_update
        return self._version if update is None else max(self._version, int(update["version"]))

    def sync_weights(self, params: Any) -> int:
        """Push new weights to every worker; returns the new version (previous + 1).

        `params`: a pytree in engine layout (nnx.State, nested dict, flat {dotted path: array}),
        a flat {HF tensor name: array} dict, or an HF directory / repo id (each worker loads it).
        Raises SpecMismatchError before any transfer if the tree does not match the fleet's, and
        SyncError (after aborting everywhere; the fleet keeps serving the previous version) if
        any worker fails to stage or times out.
        """
        with self._sync_lock:
            self._check_open()
            version = self._version + 1
            record = SyncRecord(version, "checkpoint" if isinstance(params, (str, os.PathLike)) else "pytree")
            self._history.append(record)
            try:
                self._sync.sync(params, version, record)
            except BaseException as err:
                record.error = f"{type(err).__name__}: {err}"
                log.warning(json.dumps({"event": "sync_failed", "version": version, "error": record.error,
                                        "seconds": record.seconds}))
                raise
            self._version = version
            for index in self._live_workers():
                if index not in record.workers:  # came back mid-sync: re-check its version first
                    self._router.mark(index, DOWN)
            log.info(json.dumps({"event": "sync_done", "version": version, "bytes": record.nbytes,
                                 "seconds": record.seconds, "workers": list(record.workers)}))
            return version

    # -- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        return_logprobs: bool = True,
        worker: int | None = None,
        timeout: float | None = None,
    ) -> list[Completion]:
        """Completions in input order: for each prompt its n samples (prompt_index, sample_index).

        Every prompt is validated before any is queued. `worker` pins all prompts to one worker
        (tests, debugging); by default each prompt goes to the least-loaded live worker.
        """
        stream = self.generate_async(prompts, sampling, return_logprobs=return_logprobs, worker=worker, timeout=timeout)
        groups: list[list[Completion]] = [[] for _ in range(len(stream))]
        for group in stream.groups():
            groups[group[0].prompt_index] = group
        return [c for group in groups for c in group]

    def generate_async(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        return_logprobs: bool = True,
        worker: int | None = None,
        timeout: float | None = None,
    ) -> GenerationStream:
        """Queue every prompt now and return a stream of completions as prompts finish.

        For asynchronous RL: the call returns as soon as the prompts are routed; iterate the
        stream with `for` or `async for` (a prompt's n samples arrive together), keep several
        streams in flight, and call `sync_weights` meanwhile: each completion's
        `weight_version` says which weights produced it.
        """
        self._check_open()
        if worker is not None and not (isinstance(worker, int) and 0 <= worker < self.fleet_config.num_workers):
            raise ValueError(f"worker={worker!r}: expected None or an index in [0, {self.fleet_config.num_workers})")
        if return_logprobs and self.fleet_config.engine == "sglang-jax":
            from rollout.engine.sglang.requirements import logprobs_unavailable

            raise logprobs_unavailable(platform=self.accelerator)
        encoded = self._validator.encode_all(prompts, sampling)
        dispatch = Dispatch(
            handles=self._handles,
            router=self._router,
            worker_down=self._worker_down,
            prompts=encoded,
            sampling=sampling,
            return_logprobs=return_logprobs,
            worker=worker,
            timeout=timeout,
            max_retries=self.fleet_config.max_request_retries,
        )
        return GenerationStream(dispatch)

    # -- workers: liveness and catching up --------------------------------------------------------

    @property
    def workers(self) -> list[Any]:
        """The worker actor handles, by index (for tests and debugging)."""
        return list(self._handles)

    def inject_fault(self, worker: int, point: str, message: str | None = None, delay_s: float = 0.0, times: int = 1) -> None:
        """Test-only: worker `worker` fails (raises `message`) and/or stalls at `point`
        ("stage", "commit" or "generate") the next `times` times."""
        ray.get(self._handles[worker].inject_fault.remote(point, message, delay_s, times))

    def wait_for_workers(self, timeout: float = 120.0) -> bool:
        """Wait until no worker is down (each is up, serving the fleet's version, or dead)."""
        return self._router.wait_until(lambda states: DOWN not in states, timeout)

    def _live_workers(self) -> list[int]:
        return self._router.workers_in(UP)

    def _worker_down(self, index: int, err: BaseException, epoch: int | None = None) -> None:
        if self._router.mark(index, DOWN, epoch):
            log.warning(json.dumps({"event": "worker_down", "worker": index, "error": describe_error(err)}))

    def _probe_down_workers(self) -> None:
        for index in self._router.workers_in(DOWN):
            probe = self._probes.get(index)
            if probe is None:
                self._probes[index] = (self._handles[index].ready.remote(), "ready", time.monotonic())
                continue
            ref, kind, since = probe
            if not ray.wait([ref], timeout=0)[0]:
                continue
            del self._probes[index]
            try:
                info = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                self._probes[index] = (self._handles[index].ready.remote(), "ready", since)  # restarting
                continue
            except Exception as err:  # noqa: BLE001
                if isinstance(err, ray.exceptions.ActorDiedError) and self._restarts_exhausted(index, since):
                    self._router.mark(index, DEAD)
                    log.error(json.dumps({"event": "worker_dead", "worker": index, "error": describe_error(err)}))
                else:
                    self._probes[index] = (self._handles[index].ready.remote(), "ready", since)
                continue
            if kind == "ready" and info["version"] < self.latest_version:
                self._probes[index] = (self._handles[index].catch_up.remote(), "catch_up", since)
                continue
            if self._router.mark(index, UP):
                log.info(json.dumps({"event": "worker_up", "worker": index, "down_s": round(time.monotonic() - since, 3),
                                     "pid": info.get("pid"), "starts": info.get("starts")}))

    def _restarts_exhausted(self, index: int, since: float) -> bool:
        limit = self.fleet_config.max_restarts
        if limit == 0:
            return True
        if limit > 0:
            starts = ray.get(self._registry.starts.remote(), timeout=10).get(index, 1)
            if starts - 1 >= limit:
                return True
        return time.monotonic() - since > self.fleet_config.ready_timeout_s

    # -- status and lifecycle ---------------------------------------------------------------------

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """Per worker: state, version, queue depth, active slots, tokens generated, restarts,
        outstanding work; per sync (the last `sync_history`): version, bytes, phase seconds."""
        self._check_open()
        routing = self._router.snapshot()
        calls = {h.status.remote(): i for i, h in enumerate(self._handles) if routing[i]["state"] != DEAD}
        done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=timeout)
        reports: dict[int, dict[str, Any]] = {}
        for ref in done:
            try:
                reports[calls[ref]] = ray.get(ref)
            except Exception as err:  # noqa: BLE001
                reports[calls[ref]] = {"error": describe_error(err)}
        starts = ray.get(self._registry.starts.remote(), timeout=timeout)
        workers = []
        for i, route in enumerate(routing):
            report = reports.get(i, {"error": "no status reply"})
            entry = {"index": i, **route, "alive": route["state"] == UP and "error" not in report,
                     "restarts": max(0, starts.get(i, 1) - 1)}
            for key in ("version", "serving_version", "staged_version", "queue_depth", "active_slots",
                        "tokens_generated", "requests_finished", "swaps", "compiled", "devices", "pid", "error"):
                if key in report:
                    entry[key] = report[key]
            workers.append(entry)
        return {
            "version": self._version,
            "latest_version": self.latest_version,
            "accelerator": self.accelerator,
            "num_workers": self.fleet_config.num_workers,
            "devices_per_worker": self.fleet_config.devices_per_worker,
            "workers": workers,
            "syncs": [record.as_dict() for record in self._history],
        }

    def shutdown(self) -> None:
        """Stop the workers and the registry (and Ray, if this service started it). Idempotent.
        Requests still running end with ServiceClosedError."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._router.close()
        self._health.join(timeout=5)
        calls = [h.shutdown.remote() for h in self._handles]  # engines fail their queued requests
        ray.wait(calls, num_returns=len(calls), timeout=30)
        self._release()

    def _kill_actors(self) -> None:
        _kill([*self._handles, self._registry])

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosedError("the rollout service is shut down; create a new one (rollout.init)")

    def __enter__(self) -> "RolloutService":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        cfg = self.fleet_config
        return (f"RolloutService({self.checkpoint.name!r}, {cfg.num_workers} workers x {cfg.devices_per_worker} "
                f"{self.accelerator} devices, version {self._version})")


def _health_loop(service_ref: "weakref.ref[RolloutService]", stop: threading.Event) -> None:
    """Probe down workers every _PROBE_INTERVAL_S until stopped or the service is collected."""
    while not stop.wait(_PROBE_INTERVAL_S):
        service = service_ref()
        if service is None:
            return
        try:
            service._probe_down_workers()
        except Exception:  # noqa: BLE001 - keep probing; a failed probe is retried
            log.exception("health probe failed")
        del service


def _release(stop: threading.Event, router: Router, handles: list[Any], registry: Any, owns_ray: bool) -> None:
    """End a service's fleet: stop probing, refuse new routes, kill its actors (once)."""
    stop.set()
    router.close()
    if ray.is_initialized():
        _kill([*handles, registry])
        if owns_ray:
            ray.shutdown()


def _kill(handles: list[Any]) -> None:
    for handle in handles:
        if handle is not None:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
