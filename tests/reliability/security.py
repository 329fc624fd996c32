"""Security probes on a live fleet: updates are never unpickled (a pickle sent as a manifest
or a bucket is refused without running), every bucket's checksum is verified before anything
is staged, and a local Ray started by rollout listens on loopback only."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import ray

import rollout
from rollout.protocol import BucketUpdate
from rollout.weights.buckets import BucketChecksumError, ManifestError

from .harness import (
    Outcome,
    fingerprint,
    measured,
    packed_update,
    record_versions,
    stage_on_every_worker,
    staged_versions,
)


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
        [sys.executable, str(Path(__file__).with_name("listening_sockets.py")), str(checkpoint)],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("SOCKETS ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the listening-sockets probe failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("SOCKETS "):])



def plain(value: Any) -> bool:
    """Only what msgpack's plain types map to: no extension types, no objects."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return isinstance(value, (str, int, float, bool, bytes)) or value is None


def committed_update_is_plain(svc: rollout.RolloutService) -> dict[str, bool]:
    """The last committed update as the registry holds it (what a restarted worker loads):
    is its manifest msgpack of plain values, and is each of its buckets a raw uint8 array?"""
    update = ray.get(svc.workers[0].committed_update.remote(), timeout=60)
    if not isinstance(update, BucketUpdate):
        return {"bucket_update": False}
    buckets = ray.get(list(update.refs), timeout=60)
    return {
        "bucket_update": True,
        "manifest_is_bytes": isinstance(update.manifest, bytes),
        "manifest_is_plain": plain(msgpack.unpackb(update.manifest, raw=False, strict_map_key=True)),
        "buckets_are_raw": bool(buckets) and all(
            isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.ndim == 1 for b in buckets
        ),
    }
