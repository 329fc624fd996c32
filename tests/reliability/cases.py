"""The reliability cases, defined once: the tests assert on them, bench/reliability_report.py
tabulates them.

Every case runs against a live fleet (real workers on local Ray, tiny real checkpoints) and
returns an `Outcome`: the error it raised (type and message, never the exception object, so no
traceback keeps a service alive), whether that error is the expected clear one, how many
requests in flight across the case were lost or answered twice, which versions the workers
ended on, and how many worker restarts the case cost.

    out = try_bad_update(svc, BAD_UPDATES[0], params)
    out.clear, out.lost, out.duplicates, out.worker_versions, out.fingerprint

The file is importable without pytest (the report runs it) and without jax on the driver.
It also runs as a script for the loopback check, which needs a process with no Ray in it:

    python tests/reliability/cases.py listening-sockets CHECKPOINT_DIR   # prints JSON
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import ipaddress
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import rollout
from rollout.engine.types import WeightSyncError
from rollout.weights.buckets import (
    BucketChecksumError,
    ManifestError,
    pack,
    plan_buckets,
)
from rollout.weights.loader import iter_tensors
from rollout.weights.spec import SpecMismatchError, flatten_params

# The fleet every shared-fleet case runs on: 2 workers x 2 simulated CPU devices. A sync of the
# tiny model stages in well under a second, so a 10 s stage timeout only fires on a real hang.
SYNC_TIMEOUT_S = 10.0
FLEET = dict(
    num_workers=2, devices_per_worker=2, accelerator="cpu", max_batch=8, max_seq_len=128, decode_steps=4,
    sync_timeout_s=SYNC_TIMEOUT_S,
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
# The soak's bound on each worker's RSS growth from after its warm-up to its end. The tiny
# model's whole update is ~0.5 MiB, so a leak of even one copy per sync shows within the run.
RSS_TOLERANCE_MIB = 64


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
    return sum(w["routed_requests"] for w in svc._router.snapshot())


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


# -- bad weight updates ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BadUpdate:
    name: str
    error: type | tuple[type, ...]
    fragment: str | tuple[str, ...]  # the message must contain this (or one of these)
    apply: Callable[[rollout.RolloutService, dict[str, np.ndarray]], Any]

    def __str__(self) -> str:
        return self.name


def _replaced(params: dict[str, np.ndarray], path: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**params, path: value}


def _with_value(params: dict[str, np.ndarray], path: str, value: float) -> dict[str, np.ndarray]:
    leaf = params[path].copy()
    leaf.reshape(-1)[leaf.size // 2] = value
    return _replaced(params, path, leaf)


def _without(params: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    return {p: a for p, a in params.items() if p != path}


@contextlib.contextmanager
def corrupted_buckets(byte: int = 3):
    """Flip one bit of every bucket the coordinator puts into the object store, after it was
    packed and checksummed: what a bad link or a bad DIMM between pack and stage would do.

    Buckets are recognised as what the sync puts: 1-D uint8 arrays. The default byte is the top
    byte of the first float32 of the embedding: the value doubles or halves and stays finite,
    so only the bucket checksum can notice.
    """
    import ray

    real_put = ray.put

    def put_corrupted(value: Any, *args: Any, **kwargs: Any):
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1 and value.size > byte:
            value = value.copy()
            value[byte] ^= 0x01
        return real_put(value, *args, **kwargs)

    ray.put = put_corrupted
    try:
        yield
    finally:
        ray.put = real_put


def _sync_corrupted(svc: rollout.RolloutService, params: dict[str, np.ndarray]) -> Any:
    with corrupted_buckets():
        return svc.sync_weights(params)


def packed_update(svc: rollout.RolloutService, params: dict[str, np.ndarray], version: int,
                  bucket_bytes: int | None = None):
    """Pack `params` the way the coordinator does (its layout, or smaller buckets)."""
    layout = plan_buckets(svc.spec, bucket_bytes or svc.fleet_config.bucket_bytes)
    return pack(params, layout, version)


class StageRefused(Exception):
    """Not every worker refused a worker-level stage (raised so the case shows as unclear)."""


def stage_on_every_worker(svc: rollout.RolloutService, manifest: bytes, buffers: Sequence[np.ndarray],
                          version: int) -> None:
    """Call every worker's `stage` with `manifest` and raw bucket arrays (what the coordinator
    sends), expecting each to refuse; re-raise the first refusal. Aborts the attempt after."""
    import ray

    sync_id = f"reliability-{uuid.uuid4().hex[:8]}"
    refs = [ray.put(np.asarray(b)) for b in buffers]
    calls = [h.stage.remote(sync_id, manifest, list(refs)) for h in svc.workers]
    errors: list[BaseException] = []
    try:
        for index, call in enumerate(calls):
            try:
                ray.get(call, timeout=60)
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


def _stage_truncated(svc: rollout.RolloutService, params: dict[str, np.ndarray]) -> None:
    version = svc.version + 1
    packed = packed_update(svc, params, version)
    buffers = [packed.buffers[0][:-64], *packed.buffers[1:]]
    stage_on_every_worker(svc, packed.manifest.to_bytes(), buffers, version)


def _stage_missing_bucket(svc: rollout.RolloutService, params: dict[str, np.ndarray]) -> None:
    version = svc.version + 1
    packed = packed_update(svc, params, version, bucket_bytes=64 << 10)  # several buckets
    stage_on_every_worker(svc, packed.manifest.to_bytes(), packed.buffers[:-1], version)


def _stage_older_version(svc: rollout.RolloutService, params: dict[str, np.ndarray]) -> None:
    version = svc.version - 1  # the fixture synced once, so the fleet is at >= 1
    packed = packed_update(svc, params, version)
    stage_on_every_worker(svc, packed.manifest.to_bytes(), packed.buffers, version)


BAD_UPDATES: list[BadUpdate] = [
    BadUpdate("not_a_mapping", TypeError, "expected a parameter tree",
              lambda svc, p: svc.sync_weights(list(p.values()))),
    BadUpdate("none", TypeError, "got NoneType", lambda svc, p: svc.sync_weights(None)),
    BadUpdate("missing_key", SpecMismatchError, "missing 1 path(s): layers.1.mlp.up_proj.kernel",
              lambda svc, p: svc.sync_weights(_without(p, "layers.1.mlp.up_proj.kernel"))),
    BadUpdate("extra_key", SpecMismatchError, "extra 1 path(s): layers.9.mlp.up_proj.kernel",
              lambda svc, p: svc.sync_weights({**p, "layers.9.mlp.up_proj.kernel": p["layers.1.mlp.up_proj.kernel"]})),
    BadUpdate("wrong_shape", SpecMismatchError, "norm.weight: expected shape (64,), got (65,)",
              lambda svc, p: svc.sync_weights(_replaced(p, "norm.weight", np.ones(65, np.float32)))),
    BadUpdate("transposed_kernel", SpecMismatchError, "layers.0.mlp.up_proj.kernel: expected shape (64, 128), got (128, 64)",
              lambda svc, p: svc.sync_weights(_replaced(p, "layers.0.mlp.up_proj.kernel", p["layers.0.mlp.up_proj.kernel"].T))),
    BadUpdate("integer_dtype", SpecMismatchError, "layers.0.mlp.down_proj.kernel: expected dtype float32, got int32",
              lambda svc, p: svc.sync_weights(_replaced(p, "layers.0.mlp.down_proj.kernel",
                                                        p["layers.0.mlp.down_proj.kernel"].astype(np.int32)))),
    # NaN/Inf are counted while packing, so the coordinator refuses them itself
    BadUpdate("nan", rollout.NonFiniteWeightsError, "layers.0.self_attn.q_proj.kernel: 1 non-finite value(s)",
              lambda svc, p: svc.sync_weights(_with_value(p, "layers.0.self_attn.q_proj.kernel", np.nan))),
    BadUpdate("inf", rollout.NonFiniteWeightsError, "embed_tokens: 1 non-finite value(s)",
              lambda svc, p: svc.sync_weights(_with_value(p, "embed_tokens", -np.inf))),
    BadUpdate("corrupted_bucket", rollout.SyncError, "stage failed: BucketChecksumError: bucket 0 of version",
              _sync_corrupted),
    BadUpdate("truncated_bucket", BucketChecksumError, "expected a 1-D uint8 array of", _stage_truncated),
    # A streaming worker cannot tell a lost bucket from a late one: it waits sync_timeout_s.
    BadUpdate("missing_bucket", (ValueError, TimeoutError), ("bucket refs, got", "did not arrive within"),
              _stage_missing_bucket),
    BadUpdate("version_backwards", WeightSyncError, "versions only go forward", _stage_older_version),
    BadUpdate("checkpoint_that_does_not_exist", rollout.SyncError, "stage failed",
              lambda svc, p: svc.sync_weights("/nonexistent/rollout-checkpoint")),
]


def try_bad_update(svc: rollout.RolloutService, case: BadUpdate, params: dict[str, np.ndarray]) -> Outcome:
    """Apply a bad update while requests run; the fleet must refuse it and stay as it was."""
    out = Outcome(case.name, "update", version_before=svc.version)
    with measured(out, svc):
        background = Background(svc)
        try:
            case.apply(svc, params)
        except Exception as err:  # noqa: BLE001 - the case is about which error
            out.raised(err)
        background.collect(out)
    out.clear = out.error_is(case.error, case.fragment)
    if isinstance(out.error_type, type) and issubclass(out.error_type, rollout.SyncError):
        out.details["sync_failures"] = svc.status()["syncs"][-1]["error"]
    record_versions(out, svc)
    out.details["staged"] = staged_versions(svc)
    out.fingerprint = fingerprint(svc)
    return out


# -- bad generate requests ---------------------------------------------------------------------


def unchecked_sampling(**fields: Any) -> rollout.SamplingParams:
    """SamplingParams with invalid values, built past the constructor's checks (as a mutated or
    deserialized object could arrive): the service must check them again."""
    sampling = rollout.SamplingParams(max_tokens=8)
    for name, value in fields.items():
        object.__setattr__(sampling, name, value)
    return sampling


@dataclasses.dataclass(frozen=True)
class BadRequest:
    name: str
    prompts: Any
    sampling: Any
    error: type
    fragment: str

    def __str__(self) -> str:
        return self.name


_OK = rollout.SamplingParams(max_tokens=8)
BAD_REQUESTS: list[BadRequest] = [
    BadRequest("empty_prompt", [[]], _OK, ValueError, "empty prompt"),
    BadRequest("empty_string", [""], _OK, ValueError, "empty prompt"),
    BadRequest("one_empty_among_good", [[1, 2], []], _OK, ValueError, "prompt 1: empty prompt"),
    BadRequest("too_long_prompt", [[1] * 121], _OK, ValueError, "121 tokens + max_tokens=8 = 129 exceeds max_seq_len=128"),
    BadRequest("too_many_tokens", [[1, 2]], rollout.SamplingParams(max_tokens=127), ValueError,
               "2 tokens + max_tokens=127 = 129 exceeds max_seq_len=128"),
    BadRequest("id_past_vocab", [[1, 512]], _OK, ValueError, "token id 512 is outside the vocabulary [0, 512)"),
    BadRequest("negative_id", [[-1, 2]], _OK, ValueError, "token id -1 is outside the vocabulary"),
    BadRequest("float_ids", [[1.5, 2]], _OK, TypeError, "token ids must be integers; got float"),
    BadRequest("bool_ids", [[True, 2]], _OK, TypeError, "token ids must be integers; got bool"),
    BadRequest("nested_ids", [[[1, 2]]], _OK, TypeError, "token ids must be integers; got list"),
    BadRequest("temperature_negative", [[1, 2]], unchecked_sampling(temperature=-0.5), ValueError,
               "SamplingParams.temperature=-0.5 is invalid"),
    BadRequest("temperature_nan", [[1, 2]], unchecked_sampling(temperature=float("nan")), ValueError,
               "SamplingParams.temperature=nan is invalid"),
    BadRequest("top_p_zero", [[1, 2]], unchecked_sampling(top_p=0.0), ValueError, "SamplingParams.top_p=0.0 is invalid"),
    BadRequest("top_p_above_one", [[1, 2]], unchecked_sampling(top_p=1.5), ValueError, "SamplingParams.top_p=1.5 is invalid"),
    BadRequest("n_zero", [[1, 2]], unchecked_sampling(n=0), ValueError, "SamplingParams.n=0 is invalid"),
    BadRequest("n_past_max_batch", [[1, 2]], rollout.SamplingParams(n=9, max_tokens=4), ValueError,
               "n=9 samples cannot run together in max_batch=8"),
    BadRequest("max_tokens_zero", [[1, 2]], unchecked_sampling(max_tokens=0), ValueError,
               "SamplingParams.max_tokens=0 is invalid"),
    BadRequest("max_tokens_float", [[1, 2]], unchecked_sampling(max_tokens=4.0), ValueError,
               "SamplingParams.max_tokens=4.0 is invalid"),
    BadRequest("prompt_int", [5], _OK, TypeError, "a prompt must be a string, chat messages or a list of token ids; got int"),
    BadRequest("prompt_dict", [{"role": "user", "content": "hi"}], _OK, TypeError, "got dict"),
    BadRequest("prompt_none", [None], _OK, TypeError, "got NoneType"),
    BadRequest("prompts_not_a_list", 5, _OK, TypeError, "prompts must be a list"),
    BadRequest("prompts_a_string", "hello", _OK, TypeError, "prompts must be a list"),
    BadRequest("sampling_dict", [[1, 2]], {"max_tokens": 8}, TypeError, "sampling must be a rollout.SamplingParams, got dict"),
    BadRequest("sampling_none", [[1, 2]], None, TypeError, "sampling must be a rollout.SamplingParams, got NoneType"),
]

# The same invalid values as callers normally pass them: the constructor refuses them at once.
INVALID_SAMPLING_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("temperature", {"temperature": -0.5}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("n", {"n": 0}),
    ("max_tokens", {"max_tokens": 0}),
]

GOOD_REQUEST = ([[21, 22, 23, 24]], rollout.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))


def try_bad_request(svc: rollout.RolloutService, case: BadRequest) -> Outcome:
    """Send a bad request while a good one runs: it must fail at once, queue nothing, and leave
    the good one alone (its greedy tokens are checked against an undisturbed run)."""
    out = Outcome(case.name, "request", version_before=svc.version)
    with measured(out, svc):
        good = svc.generate_async(*GOOD_REQUEST, timeout=REQUEST_TIMEOUT_S)
        routed = routed_requests(svc)
        start = time.perf_counter()
        try:
            svc.generate(case.prompts, case.sampling, timeout=REQUEST_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001
            out.raised(err)
        out.details["refused_in_s"] = time.perf_counter() - start
        out.details["queued"] = routed_requests(svc) - routed
        completions = list(good)
        tally(out, expected_keys(1, 1), completions)
        out.details["good_tokens"] = [c.token_ids for c in completions]
    out.clear = out.error_is(case.error, case.fragment)
    record_versions(out, svc)
    return out


# -- faults ------------------------------------------------------------------------------------


def wait_for_active_slots(svc: rollout.RolloutService, worker: int, timeout: float = 60.0) -> bool:
    return wait_until(lambda: worker_status(svc, worker)["active_slots"] > 0, timeout)


def kill_worker_mid_generate(svc: rollout.RolloutService, worker: int = 0) -> Outcome:
    """ray.kill a worker (Ray restarts it) while it decodes; its requests go to the other."""
    import ray

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


def _sync_in_thread(svc: rollout.RolloutService, params: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["version"] = svc.sync_weights(params)
        except Exception as err:  # noqa: BLE001
            result["error"] = err

    thread = threading.Thread(target=run, name="reliability-sync")
    thread.start()
    return thread, result


def kill_worker_mid_sync(svc: rollout.RolloutService, params: Any, worker: int = 1, point: str = "stage") -> Outcome:
    """ray.kill a worker while it is inside the sync's `point` ("stage" or "commit"; a test
    delay holds it there). Killed in stage: the sync aborts everywhere. Killed in commit: the
    update is published, so the restarted worker catches up with it."""
    import ray

    out = Outcome(f"kill_mid_{point}", "fault", version_before=svc.version)
    with measured(out, svc):
        svc.inject_fault(worker, point, delay_s=5.0)
        background = Background(svc)
        thread, result = _sync_in_thread(svc, params)
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
    import ray

    out = Outcome("feed_before_stage", "fault", version_before=svc.version)
    version = svc.version + 1
    packed = packed_update(svc, params, version)
    streaming = dataclasses.replace(packed.manifest, checksums=(None,) * len(packed.buffers)).to_bytes()
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
        svc.inject_fault(worker, "stage", delay_s=hang)
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
    import ray

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
    import ray

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


# -- security ----------------------------------------------------------------------------------


class _Mkdir:
    """A pickle payload: unpickling it creates `path` (proof that it ran)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Mkdir(str(marker)))


def stage_pickle_as_manifest(svc: rollout.RolloutService, marker: Path) -> Outcome:
    """Send a pickle (that would create `marker`) as the manifest of an update to every worker."""
    out = Outcome("pickle_as_manifest", "security", version_before=svc.version)
    with measured(out, svc):
        try:
            stage_on_every_worker(svc, malicious_pickle(marker), [np.zeros(64, np.uint8)], svc.version + 1)
        except Exception as err:  # noqa: BLE001
            out.raised(err)
    out.details["executed"] = marker.exists()
    out.details["staged"] = staged_versions(svc)
    record_versions(out, svc)
    out.clear = out.error_is(ManifestError, "expected msgpack manifest bytes") and not out.details["executed"]
    return out


def stage_pickle_as_bucket(svc: rollout.RolloutService, params: dict[str, np.ndarray], marker: Path) -> Outcome:
    """Send a pickle (padded to the bucket's size) as the bucket of a valid manifest."""
    out = Outcome("pickle_as_bucket", "security", version_before=svc.version)
    version = svc.version + 1
    packed = packed_update(svc, params, version)
    payload = np.frombuffer(malicious_pickle(marker), np.uint8)
    bucket = np.zeros(packed.buffers[0].nbytes, np.uint8)
    bucket[: payload.size] = payload
    with measured(out, svc):
        try:
            stage_on_every_worker(svc, packed.manifest.to_bytes(), [bucket, *packed.buffers[1:]], version)
        except Exception as err:  # noqa: BLE001
            out.raised(err)
    out.details["executed"] = marker.exists()
    out.details["staged"] = staged_versions(svc)
    record_versions(out, svc)
    out.clear = out.error_is(BucketChecksumError, "the bytes were corrupted") and not out.details["executed"]
    return out


def stage_bit_flipped_bucket(svc: rollout.RolloutService, params: dict[str, np.ndarray]) -> Outcome:
    """A bucket with one flipped mantissa bit: finite, right size, plausible; only the checksum
    can tell, and it must refuse it before anything is staged."""
    out = Outcome("checksum_before_staging", "security", version_before=svc.version)
    version = svc.version + 1
    packed = packed_update(svc, params, version)
    bucket = packed.buffers[0].copy()
    bucket[0] ^= 0x01  # lowest mantissa bit of the first float32: still finite, still plausible
    with measured(out, svc):
        try:
            stage_on_every_worker(svc, packed.manifest.to_bytes(), [bucket, *packed.buffers[1:]], version)
        except Exception as err:  # noqa: BLE001
            out.raised(err)
    out.details["staged"] = staged_versions(svc)
    record_versions(out, svc)
    out.fingerprint = fingerprint(svc)
    out.clear = out.error_is(BucketChecksumError, "the bytes were corrupted") and out.details["staged"] == [None] * len(svc.workers)
    return out


def stage_without_checksums(svc: rollout.RolloutService, params: dict[str, np.ndarray]) -> Outcome:
    """A manifest that carries no checksums (as a streaming sync's does) with buckets that come
    without theirs: unverifiable bytes, which must be refused, not staged."""
    out = Outcome("bucket_without_checksum", "security", version_before=svc.version)
    version = svc.version + 1
    packed = packed_update(svc, params, version)
    manifest = dataclasses.replace(packed.manifest, checksums=(None,) * len(packed.buffers))
    with measured(out, svc):
        try:
            stage_on_every_worker(svc, manifest.to_bytes(), packed.buffers, version)
        except Exception as err:  # noqa: BLE001
            out.raised(err)
    out.details["staged"] = staged_versions(svc)
    record_versions(out, svc)
    out.clear = out.error_is(BucketChecksumError, "came without a checksum") and out.details["staged"] == [None] * len(svc.workers)
    return out


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listening_sockets_of_owned_ray(checkpoint: Path, timeout: float = 240.0) -> list[dict[str, Any]]:
    """Start a service (that starts its own local Ray) in a fresh process, serve one request,
    and list every listening socket of that process tree: [{"ip", "port", "process"}]."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "listening-sockets", str(checkpoint)],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("SOCKETS ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the listening-sockets probe failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("SOCKETS "):])


def _print_listening_sockets(checkpoint: str) -> None:
    import psutil

    svc = rollout.RolloutService(checkpoint, num_workers=1, devices_per_worker=1, accelerator="cpu",
                                 max_batch=2, max_seq_len=64)
    try:
        assert svc._owns_ray, "the probe must run where rollout starts Ray itself"
        svc.generate([[1, 2, 3]], rollout.SamplingParams(max_tokens=2), timeout=120)
        me = psutil.Process()
        tree = {me.pid: me.name()} | {p.pid: p.name() for p in me.children(recursive=True)}
        sockets = [
            {"ip": c.laddr.ip, "port": c.laddr.port, "process": tree[c.pid]}
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in tree
        ]
        print("SOCKETS " + json.dumps(sockets), flush=True)
    finally:
        svc.shutdown()


# -- soak --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SoakResult:
    requests: int
    clients: int
    seconds: float = 0.0
    syncs: list[int] = dataclasses.field(default_factory=list)
    sync_errors: list[str] = dataclasses.field(default_factory=list)
    client_errors: list[str] = dataclasses.field(default_factory=list)
    answered: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_range: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (low, version, high)
    unknown_versions: set[int] = dataclasses.field(default_factory=set)  # served, never committed
    mixed_completions: int = 0
    worker_versions: frozenset[int] = frozenset()
    rss_before: dict[int, int] = dataclasses.field(default_factory=dict)  # worker -> bytes
    rss_after: dict[int, int] = dataclasses.field(default_factory=dict)
    compiled_before: dict[int, int] = dataclasses.field(default_factory=dict)  # worker -> programs
    compiled_after: dict[int, int] = dataclasses.field(default_factory=dict)
    restarts: int = 0

    @property
    def drift_mib(self) -> dict[int, float]:
        return {w: (self.rss_after[w] - self.rss_before[w]) / 2**20 for w in self.rss_before if w in self.rss_after}

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def worker_rss(svc: rollout.RolloutService) -> dict[int, int]:
    """Resident memory of each worker process (by the pid the worker reports)."""
    import psutil

    return {w["index"]: psutil.Process(w["pid"]).memory_info().rss for w in svc.status()["workers"] if "pid" in w}


_WARMUP_IDS = 1 << 20  # request ids of the warm-up (the soak's are 0..requests-1)


def worker_compiled(svc: rollout.RolloutService) -> dict[int, int]:
    """Programs each worker's engine has compiled so far."""
    return {w["index"]: w.get("compiled", 0) for w in svc.status()["workers"]}


def _soak_request(i: int) -> tuple[list[int], rollout.SamplingParams]:
    prompt = [(i * 7 + k) % 500 + 1 for k in range(2 + i % 6)]  # 2-7 tokens
    return prompt, rollout.SamplingParams(max_tokens=4 + i % 5, temperature=1.0, seed=i % (1 << 30))  # 4-8 new


def soak(svc: rollout.RolloutService, params: Sequence[Any], *, requests: int = 2000, clients: int = 8,
         sync_every_s: float = 2.0, warmup: int = 300, warmup_rounds: int = 6) -> SoakResult:
    """`clients` threads send `requests` one-prompt generate calls (4-8 new tokens) while the
    calling thread syncs `params` (in turn) every `sync_every_s`.

    Memory is read after a warm-up of the same traffic and syncs, in rounds of `warmup`
    requests until a round compiles nothing new on any worker (compiled programs take memory
    too, and would pass for a leak), and again after the run.
    """
    result = SoakResult(requests, clients)
    svc.wait_for_workers(timeout=180)
    syncs = iter(range(1 << 30))

    def sync() -> None:
        try:
            version = svc.sync_weights(params[next(syncs) % len(params)])
            result.syncs.append(version)
        except Exception as err:  # noqa: BLE001 - counted
            result.sync_errors.append(f"{type(err).__name__}: {err}")

    for round_ in range(warmup_rounds):
        compiled = worker_compiled(svc)
        first = _WARMUP_IDS + round_ * warmup
        _drive(svc, range(first, first + warmup), clients, sync_every_s, sync, lambda *a: None, [])
        if round_ > 0 and worker_compiled(svc) == compiled:
            break
    result.syncs.clear()
    result.compiled_before = worker_compiled(svc)
    gc.collect()
    result.rss_before = worker_rss(svc)
    restarts = total_restarts(svc)
    committed = {svc.version}

    answers: Counter = Counter()
    lock = threading.Lock()

    def record(i: int, low: int, high: int, outs: list) -> None:
        with lock:
            for c in outs:
                answers[(i, c.prompt_index, c.sample_index)] += 1
                if not low <= c.weight_version <= high:
                    result.out_of_range.append((low, c.weight_version, high))
                if c.mixed_versions:
                    result.mixed_completions += 1
                result.unknown_versions.add(c.weight_version)

    start = time.perf_counter()
    _drive(svc, range(requests), clients, sync_every_s, sync, record, result.client_errors)
    result.seconds = time.perf_counter() - start
    committed.update(result.syncs)
    result.unknown_versions -= committed
    result.answered = sum(1 for i in range(requests) if answers[(i, 0, 0)] >= 1)
    result.lost = requests - result.answered
    result.duplicates = sum(v - 1 for v in answers.values() if v > 1) + sum(
        v for (i, p, s), v in answers.items() if (p, s) != (0, 0))
    gc.collect()
    result.rss_after = worker_rss(svc)
    result.restarts = total_restarts(svc) - restarts
    result.worker_versions = fleet_versions(svc)
    result.compiled_after = worker_compiled(svc)
    return result


def _drive(svc: rollout.RolloutService, ids: Sequence[int], clients: int, sync_every_s: float,
           sync: Callable[[], None], record: Callable[[int, int, int, list], None], errors: list[str]) -> None:
    """`clients` threads send the requests `ids` (each answered once, via `record`) while this
    thread calls `sync` every `sync_every_s` until they are all answered."""
    queue = iter(ids)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            prompt, sampling = _soak_request(i)
            try:
                low = svc.version
                outs = svc.generate([prompt], sampling, timeout=REQUEST_TIMEOUT_S)
                record(i, low, svc.latest_version, outs)
            except Exception as err:  # noqa: BLE001 - counted as lost
                errors.append(f"request {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=client, name=f"soak-client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    next_sync = time.perf_counter() + sync_every_s
    while any(t.is_alive() for t in threads):
        time.sleep(min(0.1, max(0.0, next_sync - time.perf_counter())))
        if time.perf_counter() >= next_sync:
            sync()
            next_sync = time.perf_counter() + sync_every_s
    for t in threads:
        t.join()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "listening-sockets":
        _print_listening_sockets(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} listening-sockets CHECKPOINT_DIR")
