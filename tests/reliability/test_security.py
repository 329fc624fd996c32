"""Security: a local Ray started by rollout listens on loopback only; updates are never
unpickled (the manifest is msgpack, buckets are raw bytes), and every bucket's checksum is
verified before anything is staged."""

from __future__ import annotations

import pickle

import pytest

from .harness import fingerprint
from .security import (
    committed_update_is_plain,
    is_loopback,
    listening_sockets_of_owned_ray,
    malicious_pickle,
    stage_bit_flipped_bucket,
    stage_pickle_as_bucket,
    stage_pickle_as_manifest,
    stage_without_checksums,
)

pytestmark = pytest.mark.ray


def test_a_local_ray_started_by_rollout_listens_on_loopback_only(tiny_qwen3):
    sockets = listening_sockets_of_owned_ray(tiny_qwen3)
    assert sockets, "the probe found no listening socket at all"
    exposed = sorted({f"{s['process']} on {s['ip']}:{s['port']}" for s in sockets if not is_loopback(s["ip"])})
    assert not exposed, f"{len(exposed)} of {len(sockets)} listening sockets are not on loopback: {exposed}"


def test_the_update_manifest_is_msgpack_of_plain_values_and_its_buckets_are_raw_bytes(fleet):
    checks = committed_update_is_plain(fleet)  # the last committed update, as the registry holds it
    assert checks == {"bucket_update": True, "manifest_is_bytes": True, "manifest_is_plain": True,
                      "buckets_are_raw": True}


def test_a_pickle_sent_as_the_manifest_is_refused_and_never_run(fleet, tmp_path):
    pickle.loads(malicious_pickle(tmp_path / "control"))
    assert (tmp_path / "control").exists(), "the payload must be live: unpickling it here ran it"
    out = stage_pickle_as_manifest(fleet, tmp_path / "worker")
    assert out.clear, f"{out.error_type}: {out.message}"
    assert not out.details["executed"]
    assert out.details["staged"] == [None, None] and out.worker_versions == {fleet.version}


def test_a_pickle_sent_as_a_bucket_is_refused_and_never_run(fleet, params, tmp_path):
    out = stage_pickle_as_bucket(fleet, params, tmp_path / "worker")
    assert out.clear, f"{out.error_type}: {out.message}"
    assert not out.details["executed"]
    assert out.details["staged"] == [None, None] and out.worker_versions == {fleet.version}


def test_a_bucket_whose_checksum_fails_is_refused_before_anything_is_staged(fleet, params):
    before = fingerprint(fleet)
    out = stage_bit_flipped_bucket(fleet, params)
    assert out.clear, f"{out.error_type}: {out.message}"
    assert out.details["staged"] == [None, None]
    assert out.fingerprint == before


def test_a_bucket_that_comes_without_any_checksum_is_refused(fleet, params):
    out = stage_without_checksums(fleet, params)
    assert out.clear, f"{out.error_type}: {out.message}"
    assert out.details["staged"] == [None, None] and out.worker_versions == {fleet.version}
