"""The reliability harness: the fleet the cases run on, what a case measures, and how it looks
at the fleet from outside (public API and the workers' remote calls only).

Every case runs against a live fleet (real workers on local Ray, tiny real checkpoints) and
returns an `Outcome`: the error it raised (type and message, never the exception object, so no
traceback keeps a service alive), whether that error is the expected clear one, how many
requests in flight across the case were lost or answered twice, which versions the workers
ended on, and how many worker restarts the case cost. The cases live in one module per
category (bad_updates, bad_requests, faults, security, soak); the tests assert on them and
bench/reliability_report.py tabulates them. Importable without pytest and without jax on the
driver.

    out = bad_updates.try_bad_update(svc, bad_updates.BAD_UPDATES[0], params)
    out.clear, out.lost, out.duplicates, out.worker_versions, out.fingerprint
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import rollout
from rollout.weights.buckets import PackedUpdate, pack, plan_buckets
from rollout.weights.loader import iter_tensors
from rollout.weights.spec import flatten_params

from .fault_worker import FaultyWorker

# The fleet every shared-fleet case runs on: 2 workers x 2 simulated CPU devices. A sync of the
# tiny model stages in well under a second, so a 10 s stage timeout only fires on a real hang.
SYNC_TIMEOUT_S = 10.0
FLEET = dict(
    num_workers=2, devices_per_worker=2, accelerator="cpu", max_batch=8, max_seq_len=128, decode_steps=4,
    sync_timeout_s=SYNC_TIMEOUT_S, worker_class=FaultyWorker,
)
# Services that a case destroys (shutdown, garbage collection) are smaller: 2 workers x 1 device.
SMALL_FLEET = dict(num_workers=2, devices_per_worker=1, accelerator="cpu", max_batch=4, max_seq_len=128, decode_steps=4)

GREEDY = rollout.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
FINGERPRINT_PROMPTS = ([7, 8, 9, 10], [1, 2, 3, 4, 5, 6])
BACKGROUND = rollout.SamplingParams(max_tokens=16, temperature=1.0, n=2, seed=7, ignore_eos=True)
BACKGROUND_PROMPTS = [[11, 12, 13], [14, 15], [16, 17, 18, 19], [20]]
LONG = rollout.SamplingParams(max_tokens=96, temperature=1.0, n=2, seed=0, ignore_eos=True)
MEDIUM = rollout.SamplingParams(max_tokens=32, temperature=1.0, n=2, seed=0, ignore_eos=True)
REQUEST_TIMEOUT_S = 180.0


# -- outcomes ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What one case did to the fleet (see module docstring)."""

    case: str
    kind: str  # "update" | "request" | "fault" | "security" | "soak"
    error_type: type | None = None
    message: str = ""
    clear: bool = False  # the expected error type with the expected message fragment
    sent: int = 0  # completions expected from requests in flight across the case
    answered: int = 0  # of those, completions received
    lost: int = 0
    duplicates: int = 0
    served_versions: frozenset[int] = frozenset()  # versions that served those requests
    mixed_completions: int = 0  # completions whose tokens came from more than one version
    version_before: int | None = None
    worker_versions: frozenset[int] = frozenset()  # each worker's committed version after
    fleet_version: int | None = None  # the service's version after
    fingerprint: Any = None  # greedy outputs of every worker after the case
    restarts: int = 0  # worker restarts during the case
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def versions_mixed(self) -> bool:
        """Workers on different versions after the case, or a completion mixing versions."""
        return len(self.worker_versions) > 1 or self.mixed_completions > 0

    def error_is(self, error: type | tuple[type, ...], fragment: str | tuple[str, ...]) -> bool:
        """The error is of type `error` and its message contains `fragment` (or one of them)."""
        fragments = (fragment,) if isinstance(fragment, str) else fragment
        return (self.error_type is not None and issubclass(self.error_type, error)
                and any(f in self.message for f in fragments))

    def raised(self, err: BaseException | None) -> None:
        """Record an error as type and text only (tracebacks keep frames, and services, alive)."""
        if err is not None:
            self.error_type, self.message = type(err), str(err)
            cause = getattr(err, "cause", None)  # a worker's own error inside a RayTaskError
            self.details["error"] = " ".join(f"{type(cause or err).__name__}: {cause or err}".split())


def expected_keys(num_prompts: int, n: int) -> Counter:
    return Counter({(p, s): 1 for p in range(num_prompts) for s in range(n)})


def tally(outcome: Outcome, expected: Counter, completions: Iterable[rollout.Completion]) -> None:
    """Count answers against `expected` (prompt_index, sample_index) keys: lost, duplicated."""
    completions = list(completions)
    seen = Counter((c.prompt_index, c.sample_index) for c in completions)
    outcome.sent += sum(expected.values())
    outcome.answered += sum(min(seen[k], 1) for k in expected)
    outcome.lost += sum(1 for k in expected if seen[k] == 0)
    outcome.duplicates += sum(v - 1 for v in seen.values() if v > 1) + sum(v for k, v in seen.items() if k not in expected)
    outcome.served_versions |= frozenset(c.weight_version for c in completions)
    outcome.mixed_completions += sum(1 for c in completions if c.mixed_versions)


# -- the fleet, looked at from outside ---------------------------------------------------------


def engine_params(checkpoint: Path) -> dict[str, np.ndarray]:
    """A checkpoint's weights as a flat {engine path: host array} tree (what a trainer sends)."""
    from rollout.models.bind import ModelDef
    from rollout.models.config import ModelConfig

    spec = ModelDef.create(ModelConfig.from_pretrained(checkpoint)).spec
    return {p: np.ascontiguousarray(a) for p, a in flatten_params(dict(iter_tensors(checkpoint)), spec).items()}


def fingerprint(svc: rollout.RolloutService) -> list[tuple]:
    """Greedy (token ids, logprobs, version) of each fingerprint prompt on each worker.

    One request at a time, so every run batches the same way and the numbers compare bit for
    bit (logprobs included): equal fingerprints mean equal weights.
    """
    out = []
    for worker in range(svc.fleet_config.num_workers):
        for prompt in FINGERPRINT_PROMPTS:
            (c,) = svc.generate([prompt], GREEDY, worker=worker, timeout=REQUEST_TIMEOUT_S)
            out.append((worker, c.token_ids, c.logprobs, c.weight_version))
    return out


def worker_status(svc: rollout.RolloutService, worker: int, timeout: float = 30.0) -> dict[str, Any]:
    import ray

    return ray.get(svc.workers[worker].status.remote(), timeout=timeout)


def fleet_versions(svc: rollout.RolloutService) -> frozenset[int]:
    return frozenset(w["version"] for w in svc.status()["workers"] if "version" in w)


def staged_versions(svc: rollout.RolloutService) -> list[int | None]:
    """Each worker's staged (not yet committed) version, None where nothing is staged."""
    return [w.get("staged_version") for w in svc.status()["workers"]]


def record_versions(out: Outcome, svc: rollout.RolloutService) -> None:
    """What the fleet serves once a case is over: every worker's version and the fleet's."""
    out.worker_versions, out.fleet_version = fleet_versions(svc), svc.version


def total_restarts(svc: rollout.RolloutService) -> int:
    return sum(w["restarts"] for w in svc.status()["workers"])


def routed_requests(svc: rollout.RolloutService) -> int:
    """Requests the router ever sent to a worker (a refused request adds none)."""
    return sum(w["routed_requests"] for w in svc.status()["workers"])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Background:
    """Requests in flight across a case: routed before it starts, collected after it ends."""

    def __init__(self, svc: rollout.RolloutService, prompts: Sequence[Any] = BACKGROUND_PROMPTS,
                 sampling: rollout.SamplingParams = BACKGROUND):
        self.expected = expected_keys(len(prompts), sampling.n)
        self.stream = svc.generate_async(list(prompts), sampling, timeout=REQUEST_TIMEOUT_S)

    def collect(self, outcome: Outcome) -> list[rollout.Completion]:
        completions: list[rollout.Completion] = []
        try:
            completions.extend(self.stream)
        except Exception as err:  # noqa: BLE001 - a lost request is what the case measures
            outcome.details["background_error"] = f"{type(err).__name__}: {err}"
        tally(outcome, self.expected, completions)
        return completions


@contextlib.contextmanager
def measured(outcome: Outcome, svc: rollout.RolloutService):
    """Time the case and count the worker restarts it cost."""
    restarts = total_restarts(svc)
    start = time.perf_counter()
    try:
        yield
    finally:
        outcome.seconds = time.perf_counter() - start
        outcome.restarts = total_restarts(svc) - restarts


def wait_for_active_slots(svc: rollout.RolloutService, worker: int, timeout: float = 60.0) -> bool:
    return wait_until(lambda: worker_status(svc, worker)["active_slots"] > 0, timeout)


def sync_in_thread(svc: rollout.RolloutService, params: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `svc.sync_weights(params)` in a thread; its version or error lands in the dict."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["version"] = svc.sync_weights(params)
        except Exception as err:  # noqa: BLE001
            result["error"] = err

    thread = threading.Thread(target=run, name="reliability-sync")
    thread.start()
    return thread, result


# -- updates sent to the workers directly (what a coordinator would send) ------------------------


def packed_update(svc: rollout.RolloutService, params: dict[str, np.ndarray], version: int,
                  bucket_bytes: int | None = None) -> PackedUpdate:
    """Pack `params` the way the coordinator does (its layout, or smaller buckets)."""
    layout = plan_buckets(svc.spec, bucket_bytes or svc.fleet_config.bucket_bytes)
    return pack(params, layout, version)


def streaming_manifest(update: PackedUpdate) -> bytes:
    """The manifest a pipelined sync stages on: no checksums (each comes with its bucket)."""
    return dataclasses.replace(update.manifest, checksums=(None,) * len(update.buffers)).to_bytes()


class StageRefused(Exception):
    """Not every worker refused a worker-level stage (raised so the case shows as unclear)."""


def stage_on_every_worker(svc: rollout.RolloutService, manifest: bytes, buffers: Sequence[np.ndarray],
                          version: int) -> None:
    """Send every worker `manifest` (its `stage` call) and raw bucket arrays (its `feed` calls,
    the checksums being the manifest's), expecting each to refuse; re-raise the first refusal.
    Aborts the attempt after."""
    import ray

    sync_id = f"reliability-{uuid.uuid4().hex[:8]}"
    refs = [ray.put(np.asarray(b)) for b in buffers]
    for handle in svc.workers:  # fed first: the stage call finds them waiting
        ray.get([handle.feed.remote(sync_id, i, [ref]) for i, ref in enumerate(refs)], timeout=60)
    calls = [h.stage.remote(sync_id, manifest) for h in svc.workers]
    errors: list[BaseException] = []
    try:
        for index, call in enumerate(calls):
            try:
                ray.get(call, timeout=svc.fleet_config.sync_timeout_s + 50)
            except ray.exceptions.RayTaskError as err:
                errors.append(err)
            else:
                errors.append(StageRefused(f"worker {index} accepted the update"))
    finally:
        ray.get([h.abort.remote(sync_id, version) for h in svc.workers], timeout=60)
    unexpected = [e for e in errors if isinstance(e, StageRefused)]
    if unexpected:
        raise unexpected[0]
    raise errors[0]
