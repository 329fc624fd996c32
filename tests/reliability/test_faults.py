"""Faults on a live fleet: a worker that hangs in a sync, a bucket that overtakes its stage
call, workers killed mid-generate and mid-sync (Ray restarts them), and a service shut down or
garbage-collected while requests run.

Every request in flight is answered exactly once, the fleet ends on one version, and a service
that goes away ends its requests (never a hang) and releases its actors. The kills run after the
hang (a restarted worker recompiles); the services that are destroyed are small ones of their own.
"""

from __future__ import annotations

import pytest

import rollout

from .faults import (
    collect_while_generating,
    feed_before_stage,
    hang_in_stage,
    kill_worker_mid_generate,
    kill_worker_mid_sync,
    shutdown_while_generating,
)
from .harness import SYNC_TIMEOUT_S

pytestmark = pytest.mark.ray


def test_a_worker_hanging_in_stage_times_the_sync_out_aborts_it_everywhere_and_is_named(fleet, other_params):
    out = hang_in_stage(fleet, other_params, worker=1)
    assert out.clear, f"{out.error_type}: {out.message}"
    assert out.details["failed_workers"] == [1]
    assert SYNC_TIMEOUT_S <= out.details["sync_seconds"] < SYNC_TIMEOUT_S + 15
    assert out.details["staged"] == [None, None]
    assert fleet.version == out.version_before and out.worker_versions == {out.version_before}
    assert (out.lost, out.duplicates) == (0, 0), out.details


def test_a_bucket_fed_before_its_stage_call_is_still_staged(fleet, other_params):
    out = feed_before_stage(fleet, other_params)
    assert out.clear, f"{out.details.get('error')}; feed replies: {out.details['feed_replies']}"
    assert fleet.version == out.version_before and out.worker_versions == {out.version_before}


def test_a_worker_killed_mid_generate_loses_no_request_and_answers_none_twice(fleet):
    out = kill_worker_mid_generate(fleet, worker=0)
    assert out.details["active_before_kill"], "the kill must land while the worker decodes"
    assert (out.answered, out.lost, out.duplicates) == (out.sent, 0, 0), out.details
    assert out.details["whole_again"] and out.worker_versions == {fleet.version}
    assert out.restarts == 1


def test_a_worker_killed_mid_stage_aborts_the_sync_and_every_worker_stays_on_the_previous_version(fleet, params):
    out = kill_worker_mid_sync(fleet, params, worker=1, point="stage")
    assert out.clear, f"{out.error_type}: {out.message}"
    assert "was aborted on all of them" in out.message
    assert fleet.version == out.version_before and out.worker_versions == {out.version_before}
    assert (out.lost, out.duplicates) == (0, 0), out.details
    assert out.restarts == 1


def test_a_worker_killed_mid_commit_comes_back_on_the_committed_version(fleet, other_params):
    out = kill_worker_mid_sync(fleet, other_params, worker=1, point="commit")
    assert out.clear, f"{out.error_type}: {out.message} {out.details}"
    assert fleet.version == out.version_before + 1 and out.worker_versions == {out.version_before + 1}
    assert (out.lost, out.duplicates) == (0, 0), out.details
    assert out.restarts == 1


def test_shutting_down_the_service_ends_running_requests_with_a_clear_error_and_releases_its_actors(
    make_small_service,
):
    out = shutdown_while_generating(make_small_service)
    assert not out.details["hung"], "the requests hung after shutdown"
    assert out.clear, f"expected an error saying the service was shut down, got {out.error_type}: {out.message}"
    assert out.details["released"], "worker processes or the registry actor outlived the shutdown"
    assert out.error_type is rollout.ServiceClosedError, out.error_type


def test_a_garbage_collected_service_ends_its_requests_and_releases_its_actors(make_small_service):
    out = collect_while_generating(make_small_service)
    assert not out.details["hung"], "the requests hung after the service was dropped"
    assert out.clear, f"{out.error_type}: {out.message} lost={out.lost}"
    assert out.details["collected"], f"the service was not collected; kept alive by {out.details['kept_alive_by']}"
    assert out.details["released"], "worker processes or the registry actor outlived the service"
