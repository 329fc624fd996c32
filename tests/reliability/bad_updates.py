"""Bad weight updates against a live fleet: each must be refused with a clear error while the
fleet goes on serving the previous version, bit for bit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

import rollout
from rollout.engine.types import WeightSyncError
from rollout.weights.buckets import BucketChecksumError
from rollout.weights.spec import SpecMismatchError

from .harness import (
    Background,
    Outcome,
    fingerprint,
    measured,
    packed_update,
    record_versions,
    stage_on_every_worker,
    staged_versions,
)


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



def _sync_corrupted(svc: rollout.RolloutService, params: dict[str, np.ndarray]) -> Any:
    """A sync whose buckets every worker receives with one bit flipped (byte 3: the top byte of
    the first float32 of the embedding, so the value doubles or halves and stays finite; only
    the bucket checksum can notice): what a bad link or a bad DIMM between pack and stage does."""
    ray.get([h.corrupt_buckets.remote(byte=3) for h in svc.workers])
    try:
        return svc.sync_weights(params)
    finally:
        ray.get([h.clear_faults.remote() for h in svc.workers])



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
    BadUpdate("missing_bucket", TimeoutError, "did not arrive within",
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

