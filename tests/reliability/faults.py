"""Faults on a live fleet: a worker that hangs in a sync, a bucket that overtakes its stage
call, workers killed mid-generate and mid-sync (Ray restarts them), and a service shut down or
garbage-collected while requests run. Hangs and delays are injected by the test-side worker
(fault_worker.FaultyWorker); kills are real `ray.kill`s."""

from __future__ import annotations

import gc
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

import rollout

from .harness import (
    LONG,
    MEDIUM,
    Background,
    Outcome,
    expected_keys,
    fleet_versions,
    measured,
    packed_update,
    record_versions,
    staged_versions,
    streaming_manifest,
    sync_in_thread,
    tally,
    wait_for_active_slots,
    wait_until,
)


def kill_worker_mid_generate(svc: rollout.RolloutService, worker: int = 0) -> Outcome:
    """ray.kill a worker (Ray restarts it) while it decodes; its requests go to the other."""
    out = Outcome("kill_mid_generate", "fault", version_before=svc.version)
    with measured(out, svc):
        background = Background(svc, [[9, 10, 11]] * 12, LONG)
        out.details["active_before_kill"] = wait_for_active_slots(svc, worker)
        ray.kill(svc.workers[worker], no_restart=False)
        background.collect(out)
        out.details["whole_again"] = svc.wait_for_workers(timeout=180)
    record_versions(out, svc)
    out.clear = out.lost == 0 and out.duplicates == 0
    return out


def kill_worker_mid_sync(svc: rollout.RolloutService, params: Any, worker: int = 1, point: str = "stage") -> Outcome:
    """ray.kill a worker while it is inside the sync's `point` ("stage" or "commit"; a test
    delay holds it there). Killed in stage: the sync aborts everywhere. Killed in commit: the
    update is published, so the restarted worker catches up with it."""
    out = Outcome(f"kill_mid_{point}", "fault", version_before=svc.version)
    with measured(out, svc):
        ray.get(svc.workers[worker].inject_fault.remote(point, delay_s=5.0))
        background = Background(svc)
        thread, result = sync_in_thread(svc, params)
        if point == "commit":  # the update is published (the commit point) before commits go out
            wait_until(lambda: svc.latest_version > out.version_before, 60)
        time.sleep(1.5 if point == "stage" else 0.5)  # inside the 5 s delay
        ray.kill(svc.workers[worker], no_restart=False)
        thread.join(timeout=120)
        out.details["sync_finished"] = not thread.is_alive()
        out.raised(result.get("error"))
        out.details["synced_version"] = result.get("version")
        background.collect(out)
        out.details["whole_again"] = svc.wait_for_workers(timeout=180)
        # A worker that died before its first request after the sync is found by the health probe
        # only once something fails on it: wait until every worker reports the fleet's version.
        wait_until(lambda: fleet_versions(svc) == {svc.version}, 120, interval=0.5)
    record_versions(out, svc)
    if point == "stage":
        out.clear = out.error_is(rollout.SyncError, f"worker {worker}: stage failed: the worker")
    else:
        out.clear = out.error_type is None and result.get("version") == out.version_before + 1
    return out


def feed_before_stage(svc: rollout.RolloutService, params: dict[str, np.ndarray]) -> Outcome:
    """Deliver every bucket of a streaming update (a manifest without checksums; each bucket
    comes with its own, by `feed`) before the `stage` call that announces the update.

    Ray does not order the calls of an async actor, even from one caller, so under load a
    coordinator's feed can overtake its stage: every worker must still stage the update, not
    wait sync_timeout_s for buckets it was already given. Aborted after, so nothing stays staged.
    """
    out = Outcome("feed_before_stage", "fault", version_before=svc.version)
    version = svc.version + 1
    packed = packed_update(svc, params, version)
    streaming = streaming_manifest(packed)
    sync_id = f"reliability-{uuid.uuid4().hex[:8]}"
    refs = [ray.put(b) for b in packed.buffers]
    with measured(out, svc):
        replies = [ray.get(h.feed.remote(sync_id, i, [ref], packed.manifest.checksums[i]), timeout=60)
                   for h in svc.workers for i, ref in enumerate(refs)]
        out.details["feed_replies"] = sorted({str(r) for r in replies})
        try:
            ray.get([h.stage.remote(sync_id, streaming) for h in svc.workers], timeout=svc.fleet_config.sync_timeout_s + 30)
        except Exception as err:  # noqa: BLE001
            out.raised(err)
        out.details["staged"] = staged_versions(svc)
        ray.get([h.abort.remote(sync_id, version) for h in svc.workers], timeout=60)
    record_versions(out, svc)
    out.clear = out.error_type is None and out.details["staged"] == [version] * len(svc.workers)
    return out


def hang_in_stage(svc: rollout.RolloutService, params: Any, worker: int = 1) -> Outcome:
    """A worker that hangs while staging (a test delay longer than sync_timeout_s): the sync
    times out, aborts on every worker and names the one that hung."""
    out = Outcome("hang_in_stage", "fault", version_before=svc.version)
    timeout = svc.fleet_config.sync_timeout_s
    hang = timeout + 3.0
    with measured(out, svc):
        ray.get(svc.workers[worker].inject_fault.remote("stage", delay_s=hang))
        background = Background(svc)
        start = time.monotonic()
        try:
            svc.sync_weights(params)
        except Exception as err:  # noqa: BLE001
            out.raised(err)
        out.details["sync_seconds"] = time.monotonic() - start
        if isinstance(out.error_type, type) and issubclass(out.error_type, rollout.SyncError):
            out.details["failed_workers"] = sorted(_last_sync_failures(svc))
        out.details["staged"] = staged_versions(svc)
        background.collect(out)
        time.sleep(max(0.0, start + hang + 0.5 - time.monotonic()))  # let the hung stage return
    record_versions(out, svc)
    out.clear = out.error_is(rollout.SyncError, f"worker {worker}: stage did not finish within sync_timeout_s={timeout:g}s")
    return out


def _last_sync_failures(svc: rollout.RolloutService) -> list[int]:
    error = svc.status()["syncs"][-1]["error"] or ""
    return [int(line.split()[1].rstrip(":")) for line in error.splitlines() if line.strip().startswith("worker ")]


def actors_released(pids: Sequence[int], registry: str | None, timeout: float) -> bool:
    """Every worker process exited and the service's named registry actor is gone."""
    import psutil

    def gone() -> bool:
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        return registry not in names

    return wait_until(gone, timeout, interval=0.25)


def _registries() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("rollout-registry-")}


def _consume(stream: Any, sink: dict[str, Any]) -> None:
    completions = []
    try:
        for completion in stream:
            completions.append(completion)
    except Exception as err:  # noqa: BLE001
        sink["error"] = (type(err), str(err))
    sink["completions"] = completions


def _streaming_on_a_new_service(make_service: Callable[[], rollout.RolloutService], sampling: Any):
    """A new service with a stream of 8 requests running, consumed by a thread into `sink`.
    Returns the service and (start time, its registry's name, worker pids, sink, thread); the
    caller holds the only reference to the service."""
    before = _registries()
    svc = make_service()
    start = time.perf_counter()
    registry = next(iter(_registries() - before), None)
    pids = [w["pid"] for w in svc.status()["workers"]]
    sink: dict[str, Any] = {}
    consumer = threading.Thread(target=_consume, args=(svc.generate_async([[9, 10, 11]] * 8, sampling, timeout=120), sink))
    consumer.start()
    wait_for_active_slots(svc, 0)
    return svc, (start, registry, pids, sink, consumer)


def shutdown_while_generating(make_service: Callable[[], rollout.RolloutService]) -> Outcome:
    """Shut a service down while a stream of requests runs: the stream ends with a clear error
    (it does not hang) and the actors are released."""
    out = Outcome("shutdown_mid_generate", "fault")
    svc, (start, registry, pids, sink, consumer) = _streaming_on_a_new_service(make_service, LONG)
    svc.shutdown()
    consumer.join(timeout=60)
    out.details["hung"] = consumer.is_alive()
    out.details["completed_before_error"] = len(sink.get("completions", []))
    if "error" in sink:
        out.error_type, out.message = sink["error"]
    out.details["released"] = actors_released(pids, registry, timeout=30)
    out.clear = not out.details["hung"] and out.error_type is not None and "shut down" in out.message
    out.seconds = time.perf_counter() - start
    return out


def collect_while_generating(make_service: Callable[[], rollout.RolloutService]) -> Outcome:
    """Drop the last reference to a service (`del svc; gc.collect()`) while a stream of its
    requests runs: the stream ends (answered, or a clear error; never a hang), and once the
    stream is gone too, the service is collected and its actors are released."""
    out = Outcome("garbage_collected_mid_generate", "fault")
    svc, (start, registry, pids, sink, consumer) = _streaming_on_a_new_service(make_service, MEDIUM)
    alive = weakref.ref(svc)
    del svc
    gc.collect()
    consumer.join(timeout=120)
    out.details["hung"] = consumer.is_alive()
    del consumer
    gc.collect()
    leftover = alive()
    out.details["collected"] = leftover is None
    if leftover is not None:
        out.details["kept_alive_by"] = sorted({type(r).__name__ for r in gc.get_referrers(leftover)})
        leftover.shutdown()  # clean up for the next case; the case has failed already
        del leftover
    completions = sink.get("completions", [])
    tally(out, expected_keys(8, MEDIUM.n), completions)
    if "error" in sink:
        out.error_type, out.message = sink["error"]
    out.details["released"] = actors_released(pids, registry, timeout=30)
    out.clear = not out.details["hung"] and (out.lost == 0 or out.error_type is not None)
    out.seconds = time.perf_counter() - start
    return out

