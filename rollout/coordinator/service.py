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
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rollout.coordinator.cache_totals import prefix_cache_totals
from rollout.coordinator.dispatch import Dispatch, GenerationStream
from rollout.coordinator.fleet import (
    FleetConfig,
    actor_options,
    check_placement,
    placement_message,
    resolve_accelerator,
    service_configs,
)
from rollout.coordinator.fleet_view import FleetView
from rollout.coordinator.registry import UpdateRegistry
from rollout.coordinator.routing import DEAD, DOWN, UP, Router
from rollout.coordinator.score_dispatch import score_on_fleet
from rollout.coordinator.startup import StartWatch, start_error, start_hint
from rollout.coordinator.streaming import FleetRequest, TokenStream
from rollout.coordinator.sync import SyncRecord, WeightSync, update_source
from rollout.engine.backend import EngineCapabilities
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.structured import ConstraintCompiler
from rollout.engine.types import Completion
from rollout.errors import PlacementError, ServiceClosedError, WorkerStartError, describe_error
from rollout.local_ray import start_local_ray
from rollout.models.config import ModelConfig
from rollout.prompts import Prompt, PromptValidator
from rollout.protocol import WorkerStatus
from rollout.scores import Scores, check_hidden_layers, check_routes, check_temperature, encode_pairs
from rollout.tokenizer import Tokenizer
from rollout.weights.loader import resolve_checkpoint
from rollout.weights.lora import LoraAdapter
from rollout.weights.spec import ParamSpec
from rollout.worker.actor import RolloutWorker

log = logging.getLogger("rollout.coordinator.service")
_PROBE_INTERVAL_S = 0.25
# Options that were removed, and what to do instead.
_REMOVED_OPTIONS = {
    "pipelined_sync": "every sync is pipelined now (workers stage bucket k while bucket k+1 is packed and "
    "put; it was the default): drop the option",
}


class RolloutService:
    """A fleet of `num_workers` engines, each on `devices_per_worker` devices.

    `model` is an HF directory or repo id (the driver reads its config and tokenizer to validate
    prompts; each worker loads the weights, or only shapes with load_format="dummy"). The
    keyword options are the fields of FleetConfig (accelerator, engine, bucket_bytes, checksum,
    max_restarts, env_vars, ...) and EngineConfig (load_format, dtype, max_batch, max_seq_len,
    swap_policy, ...); an option not given keeps its field's default (rollout.coordinator.fleet.service_configs). Ray is started locally (listening on loopback only) if it is not initialized; otherwise the service joins the
    running Ray (e.g. after `ray.init(address="auto")`); `ray_init_kwargs` go to that ray.init.
    `worker_class` is the actor class of the workers: RolloutWorker or a subclass of it (the
    reliability tests inject faults with one).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        num_workers: int = FleetConfig.num_workers,
        devices_per_worker: int = FleetConfig.devices_per_worker,
        *,
        ray_init_kwargs: dict[str, Any] | None = None,
        worker_class: type[RolloutWorker] = RolloutWorker,
        **options: Any,
    ):
        removed = sorted(set(options) & set(_REMOVED_OPTIONS))
        if removed:
            raise TypeError("; ".join(f"option {name!r} was removed: {_REMOVED_OPTIONS[name]}" for name in removed))
        if not (isinstance(worker_class, type) and issubclass(worker_class, RolloutWorker)):
            raise TypeError(f"worker_class={worker_class!r}: expected rollout.worker.actor.RolloutWorker or a subclass")
        self.fleet_config, self.engine_config = service_configs(
            {"num_workers": num_workers, "devices_per_worker": devices_per_worker, **options}
        )
        self.checkpoint = resolve_checkpoint(model)
        self.model_config = ModelConfig.from_pretrained(self.checkpoint)
        self.tokenizer = Tokenizer.from_pretrained(self.checkpoint)
        self._validator = PromptValidator(self.model_config, self.tokenizer, self.engine_config)
        # structured output is compiled here too, so a bad schema or regex is refused before any send
        self._constraints = ConstraintCompiler(
            self.tokenizer, self.model_config.vocab_size,
            frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids),
        )
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
            self._start_fleet(worker_class)
        except BaseException:
            self._kill_actors()
            if self._owns_ray:
                ray.shutdown()
            raise
        self._router = Router(self.fleet_config.num_workers)
        # The one view of the fleet that generate, streams, score and the sync are given.
        self._fleet = FleetView(tuple(self._handles), self._router, self._registry, self.spec,
                                self.fleet_config.max_request_retries)
        self._version = 0  # committed on every live worker
        self._sync_lock = threading.Lock()
        self._history: collections.deque[SyncRecord] = collections.deque(maxlen=self.fleet_config.sync_history)
        self._sync = WeightSync(
            self._fleet,
            self.fleet_config.bucket_bytes,
            self.fleet_config.sync_timeout_s,
            self.fleet_config.checksum,
            relay_fanout=self.fleet_config.relay_fanout,
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

    def _start_fleet(self, worker_class: type[RolloutWorker]) -> None:
        cfg = self.fleet_config
        if cfg.check_resources:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            check_placement(cfg, self.accelerator, nodes, ray.cluster_resources(), ray.available_resources())
            if cfg.engine == "sglang-jax" and self.accelerator == "cpu":  # its KV pool is host memory
                from rollout.engine.sglang.sizing import check_host_memory

                check_host_memory(self.model_config, self.engine_config, cfg.num_workers, [n.get("memory", 0.0) for n in nodes])
        namespace = ray.get_runtime_context().namespace
        registry_name = f"rollout-registry-{uuid.uuid4().hex[:10]}"
        # On the coordinator's node: a registry on a worker's node would be lost with that node
        # (a preempted host), and with it the committed update restarted workers catch up from.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._registry = ray.remote(UpdateRegistry).options(
            name=registry_name, num_cpus=0, scheduling_strategy=here).remote()
        options = actor_options(cfg, self.accelerator, os.environ)
        worker_cls = ray.remote(worker_class)
        self._handles = [
            worker_cls.options(**options).remote(i, self._model_ref, self.engine_config, cfg, registry_name, namespace)
            for i in range(cfg.num_workers)
        ]
        start = time.monotonic()
        probes = {h.ready.remote(): i for i, h in enumerate(self._handles)}
        # A worker that dies before it is ready is restarted by Ray; one that keeps dying (its
        # engine's start killed for memory, crashing) fails start-up after start_attempts tries.
        watch = StartWatch(self._handles, cfg.start_attempts)
        pending, replies = list(probes), []
        while pending and (left := cfg.ready_timeout_s - (time.monotonic() - start)) > 0:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(1.0, left))
            for ref in done:
                try:
                    replies.append(ray.get(ref))
                except Exception as err:  # say which worker and why
                    raise WorkerStartError(
                        f"worker {probes[ref]} failed to start: {start_error(err)}\n"
                        f"{start_hint(cfg, self.engine_config)}"
                    ) from err
            failing = watch.failing(sorted(probes[r] for r in pending))
            if failing is not None:
                raise WorkerStartError(f"{watch.report(failing)}\n{start_hint(cfg, self.engine_config)}")
        if pending:
            raise PlacementError(
                placement_message(
                    cfg, self.accelerator, ray.cluster_resources(), ray.available_resources(),
                    waited_s=time.monotonic() - start,
                )
                + f" Workers not ready: {sorted(probes[r] for r in pending)}."
            )
        self.spec: ParamSpec = ray.get(self._handles[0].spec.remote())
        # What the backend cannot do (logprobs, scoring): refused here before anything is queued.
        # Every worker runs the same backend, so one reply says it for all.
        self.capabilities: EngineCapabilities = replies[0].capabilities
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
        update = self._sync.committed
        return self._version if update is None else max(self._version, update.version)

    def set_relay_fanout(self, fanout: int) -> None:
        """Change FleetConfig.relay_fanout for the syncs that follow (0: every worker fetches the
        buckets from the coordinator's node; k >= 1: relayed across nodes, each worker feeding up to
        k others). Waits for a sync in progress. The relay benchmark compares settings on one fleet."""
        config = dataclasses.replace(self.fleet_config, relay_fanout=fanout)  # checked as FleetConfig checks it
        with self._sync_lock:
            self.fleet_config = config
            self._sync.relay_fanout = fanout

    def sync_weights(self, params: Any) -> int:
        """Push new weights to every worker; returns the new version (previous + 1).

        `params`: a pytree in engine layout (nnx.State, nested dict, flat {dotted path: array}),
        a flat {HF tensor name: array} dict, or an HF directory / repo id (each worker loads it);
        or a LoRA adapter: a rollout.LoraAdapter (LoraAdapter.from_peft(tensors, config)) or a
        PEFT adapter directory, of which only the factors are sent; each worker serves it merged
        onto its base (the last full update), and a later full update replaces the base and
        drops the adapter (rollout.engine.native.lora).
        Raises SpecMismatchError (LoraAdapterError) before any transfer if the update does not
        match the fleet's model, FeatureUnavailableError for an adapter on a backend without
        LoRA, and
        SyncError (after aborting everywhere; the fleet keeps serving the previous version) if
        any worker fails to stage or times out.
        """
        source = update_source(params)  # how this update reaches the workers, decided once
        if source == "lora":
            if not isinstance(params, LoraAdapter):
                params = LoraAdapter.from_peft_dir(params)
            self.capabilities.require("lora")  # before any worker changes
        with self._sync_lock:
            self._check_open()
            version = self._version + 1
            record = SyncRecord(version, source)
            self._history.append(record)
            try:
                self._sync.sync(params, version, record)
            except BaseException as err:
                record.error = f"{type(err).__name__}: {err}"
                log.warning(json.dumps({"event": "sync_failed", "version": version, "error": record.error,
                                        "seconds": record.seconds}))
                raise
            self._version = version
            for index in self._fleet.live_workers():
                if index not in record.workers:  # came back mid-sync: re-check its version first
                    self._router.mark(index, DOWN)
            log.info(json.dumps({"event": "sync_done", "version": version, "bytes": record.nbytes,
                                 "seconds": record.seconds, "workers": list(record.workers)}))
            return version

    # -- generation -------------------------------------------------------------------------------

    @property
    def validator(self) -> PromptValidator:
        """The driver's prompt checks (model config, tokenizer, engine limits): what generate and
        score run on every prompt before anything is sent. The HTTP server encodes and checks its
        requests with it too."""
        return self._validator

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
        if return_logprobs:
            self.capabilities.require("logprobs")
        encoded = self._validator.encode_all(prompts, sampling)  # checks sampling's type first
        if sampling.return_routed_experts:
            self.capabilities.require("routed_experts")
        if sampling.top_logprobs:
            self.capabilities.require("top_logprobs")
        self._check_constraint(sampling)
        dispatch = Dispatch(
            self._fleet, prompts=encoded, sampling=sampling, return_logprobs=return_logprobs, worker=worker,
            timeout=timeout,
        )
        return GenerationStream(dispatch)

    def generate_stream(
        self, prompt: Prompt, sampling: SamplingParams = SamplingParams(), *, return_logprobs: bool = True
    ) -> TokenStream:
        """One prompt's samples token by token: an async iterator of TokenDelta lists, for
        servers and agents on an event loop (see rollout.coordinator.streaming). Validated now; the request
        is sent when iteration starts and cancelled on its worker if the iteration stops early.
        With sampling.return_routed_experts, each sample's last delta carries its routed_experts."""
        return TokenStream(self._fleet_request(prompt, sampling, return_logprobs))

    async def agenerate(
        self, prompt: Prompt, sampling: SamplingParams = SamplingParams(), *, return_logprobs: bool = True
    ) -> list[Completion]:
        """One prompt's n completions, awaited on the caller's event loop (no thread per call)."""
        return await self._fleet_request(prompt, sampling, return_logprobs).completions()

    def _check_constraint(self, sampling: SamplingParams) -> None:
        """Refuse a structured-output constraint the backend cannot follow or llguidance cannot compile."""
        if sampling.constraint is not None:
            self.capabilities.require("structured_output")
            self._constraints.compile(sampling)

    def _fleet_request(self, prompt: Prompt, sampling: SamplingParams, return_logprobs: bool) -> FleetRequest:
        self._check_open()
        if return_logprobs:
            self.capabilities.require("logprobs")
        ids = self._validator.encode_all([prompt], sampling)[0]  # checks sampling's type first
        if sampling.return_routed_experts:  # streams: on each sample's last TokenDelta
            self.capabilities.require("routed_experts")
        if sampling.top_logprobs:
            self.capabilities.require("top_logprobs")
        self._check_constraint(sampling)
        return FleetRequest(
            self._fleet, prompt_ids=ids, sampling=sampling, return_logprobs=return_logprobs, tokenizer=self.tokenizer
        )

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Any],
        *,
        temperature: float = 1.0,
        timeout: float | None = None,
        routed_experts: Sequence[Any] | None = None,
        return_hidden_states: Sequence[int] | None = None,
    ) -> Scores:
        """Per-token logprobs of `completions[i]` (token ids) after `prompts[i]`, teacher-forced:
        a `Scores` with one float32 array per pair and the one weight version that computed them
        all (at least the version committed when the call started). At `temperature` T the
        numbers are log_softmax(logits / T), the distribution generate samples from. Every pair
        is validated before any is sent. See rollout.coordinator.score_dispatch.

        `routed_experts[i]` (mixture-of-experts models): the experts of pair i's fed positions,
        as `Completion.routed_experts` gives them ((prompt + completion tokens - 1, MoE layers,
        top_k)); the workers' forwards use them instead of their routers' choice (routing
        replay), so the logprobs are those of the routes generation took. Checked here (shape,
        expert range, a MoE model) before any pair is sent.

        `return_hidden_states=[layer indices]` (dense models; 0: the embeddings, i: after layer
        i, num_layers: after the final norm): `Scores.hidden_states` holds, per pair, the
        workers' residual stream at those layers at every prompt + completion position (float32
        (layers, tokens, hidden), as Engine.score gives it), from the same forward as the
        logprobs. Checked here (integers in range, a dense model) before any pair is sent."""
        self._check_open()
        self.capabilities.require("score")
        prompt_ids, completion_ids = encode_pairs(
            self._validator.encode, prompts, completions,
            vocab_size=self.model_config.vocab_size, max_seq_len=self.engine_config.max_seq_len,
        )
        routes = None
        if routed_experts is not None:
            self.capabilities.require("routed_experts")
            routes = [r.astype(np.int16) for r in check_routes(self.model_config, prompt_ids, completion_ids, routed_experts)]
        hidden_layers = None
        if return_hidden_states is not None:
            self.capabilities.require("hidden_states")
            hidden_layers = check_hidden_layers(self.model_config, return_hidden_states)
        return score_on_fleet(
            self._fleet, prompts=prompt_ids, completions=completion_ids, temperature=check_temperature(temperature),
            timeout=timeout, min_version=self._version, routes=routes, hidden_layers=hidden_layers,
        )

    # -- workers: liveness and catching up --------------------------------------------------------

    @property
    def workers(self) -> list[Any]:
        """The worker actor handles, by index (for tests and debugging)."""
        return list(self._handles)

    def wait_for_workers(self, timeout: float = 120.0) -> bool:
        """Wait until no worker is down (each is up, serving the fleet's version, or dead)."""
        return self._router.wait_until(lambda states: DOWN not in states, timeout)

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
            except Exception as err:  # noqa: BLE001 - any probe failure: dead or still down
                if isinstance(err, ray.exceptions.ActorDiedError) and self._restarts_exhausted(index, since):
                    self._router.mark(index, DEAD)
                    log.error(json.dumps({"event": "worker_dead", "worker": index, "error": describe_error(err)}))
                else:
                    self._probes[index] = (self._handles[index].ready.remote(), "ready", since)
                continue
            if kind == "ready" and info.version < self.latest_version:
                self._probes[index] = (self._handles[index].catch_up.remote(), "catch_up", since)
                continue
            if self._router.mark(index, UP):
                log.info(json.dumps({"event": "worker_up", "worker": index, "down_s": round(time.monotonic() - since, 3),
                                     "pid": getattr(info, "pid", None), "starts": getattr(info, "starts", None)}))

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
        """Per worker: its WorkerStatus (version, staged version, queue depth, active slots,
        tokens generated, ...; rollout.protocol) with its routing state, outstanding work and
        restarts, or the error that kept it from answering; per sync (the last `sync_history`):
        version, bytes, phase seconds."""
        self._check_open()
        routing = self._router.snapshot()
        calls = {h.status.remote(): i for i, h in enumerate(self._handles) if routing[i]["state"] != DEAD}
        done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=timeout)
        reports: dict[int, WorkerStatus | dict[str, str]] = {}
        for ref in done:
            try:
                reports[calls[ref]] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a worker that fails its status reports the error
                reports[calls[ref]] = {"error": describe_error(err)}
        starts = ray.get(self._registry.starts.remote(), timeout=timeout)
        workers = []
        for i, route in enumerate(routing):
            report = reports.get(i, {"error": "no status reply"})
            # the worker's own report (WorkerStatus), then what the coordinator knows better:
            # routing, liveness as routed, restarts as counted by the registry
            workers.append({**report, "index": i, **route, "alive": route["state"] == UP and "error" not in report,
                            "restarts": max(0, starts.get(i, 1) - 1)})
        return {
            "version": self._version,
            "latest_version": self.latest_version,
            "accelerator": self.accelerator,
            "num_workers": self.fleet_config.num_workers,
            "devices_per_worker": self.fleet_config.devices_per_worker,
            "workers": workers,
            "prefix_cache": prefix_cache_totals(workers),  # summed over workers; None: no cache
            "syncs": [record.as_dict() for record in self._history],
        }

    @property
    def closed(self) -> bool:
        """True once shutdown() ran (generate, score, sync_weights and status then raise
        ServiceClosedError)."""
        return self._closed

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        cfg = self.fleet_config
        return (f"RolloutService({self.checkpoint.name!r}, {cfg.num_workers} workers x {cfg.devices_per_worker} "
                f"{self.accelerator} devices, version {self._version})")


def _health_loop(service_ref: weakref.ref[RolloutService], stop: threading.Event) -> None:
    """Probe down workers every _PROBE_INTERVAL_S until stopped or the service is collected."""
    while not stop.wait(_PROBE_INTERVAL_S):
        service = service_ref()
        if service is None:
            return
        try:
            service._probe_down_workers()
        except Exception:  # keep probing; a failed probe is retried
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
