"""Bad weight updates against a live fleet: each is refused with a clear error; every worker goes
on serving the previous version, bit for bit (greedy token ids and logprobs), and no request in
flight meanwhile is lost or answered twice."""

from __future__ import annotations

import pytest

import rollout

from .bad_updates import BAD_UPDATES, try_bad_update
from .harness import fingerprint

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def baseline(shared_fleet, params):
    """Every worker's greedy outputs on `params`, before any bad update. The fleet is synced to
    `params` first: a module that ran earlier in the session may have left it on other weights
    (test_faults.py commits `other_params`), and the last test here syncs `params` again."""
    assert shared_fleet.wait_for_workers(timeout=180)
    shared_fleet.sync_weights(params)
    return fingerprint(shared_fleet)


def test_every_worker_serves_the_same_greedy_outputs(baseline):
    per_worker = {}
    for worker, tokens, logprobs, version in baseline:
        per_worker.setdefault(worker, []).append((tokens, logprobs, version))
    assert len(per_worker) == 2 and per_worker[0] == per_worker[1]


@pytest.mark.parametrize("case", BAD_UPDATES, ids=str)
def test_a_bad_update_is_refused_and_every_worker_serves_the_previous_version_bit_for_bit(
    fleet, params, baseline, case
):
    out = try_bad_update(fleet, case, params)
    assert out.clear, f"expected {case.error} with {case.fragment!r}, got {out.error_type}: {out.message}"
    if issubclass(out.error_type, rollout.SyncError):
        assert "was aborted on all of them" in out.message
    assert (out.lost, out.duplicates) == (0, 0), out.details
    assert out.served_versions == {out.version_before}
    assert fleet.version == out.version_before and out.worker_versions == {out.version_before}
    assert out.details["staged"] == [None, None]
    assert out.fingerprint == baseline


def test_the_next_good_update_after_the_bad_ones_is_the_next_version(fleet, params, baseline):
    before = fleet.version
    assert fleet.sync_weights(params) == before + 1
    assert [(w, t, lp) for w, t, lp, _ in fingerprint(fleet)] == [(w, t, lp) for w, t, lp, _ in baseline]
