"""The weight state machine every backend promises (rollout.engine.backend; one implementation,
rollout.engine.weight_state.WeightState), as tests a backend's test module inherits.

A module subclasses `WeightStateContract` as `TestWeightStateContract` and provides a `backend`
fixture: a `Backend` (an engine whose weights may be staged and committed at any time, an update
it accepts, and an update it refuses). Versions are taken relative to the engine's own, so the
tests share one engine and leave nothing staged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from rollout.engine.types import WeightSyncError

TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class Backend:
    engine: Any  # stage, commit, abort, version, staged_version, serving_version
    update: Any  # a full update the engine accepts
    refused: Any  # an update it refuses when staged (a leaf missing)
    refusal: type[Exception]  # what it raises for `refused`


class WeightStateContract:
    def test_a_committed_version_is_served_once_commit_with_wait_returns(self, backend: Backend):
        engine, version = backend.engine, backend.engine.version + 1
        assert engine.stage(version, backend.update).version == version
        assert engine.staged_version == version and engine.serving_version == version - 1
        assert engine.commit(version, wait=True, timeout=TIMEOUT) == version
        assert (engine.version, engine.serving_version, engine.staged_version) == (version, version, None)

    def test_a_stage_of_the_committed_version_or_older_is_refused(self, backend: Backend):
        engine, committed = backend.engine, backend.engine.version
        for version in (committed, committed - 1):
            with pytest.raises(WeightSyncError, match=f"version {committed} is already committed"):
                engine.stage(version, backend.update)
        assert engine.staged_version is None and engine.version == committed

    def test_a_stage_older_than_the_staged_copy_is_refused_and_a_retry_replaces_it(self, backend: Backend):
        engine, newer = backend.engine, backend.engine.version + 2
        engine.stage(newer, backend.update)
        with pytest.raises(WeightSyncError, match=f"version {newer} is already staged"):
            engine.stage(newer - 1, backend.update)
        engine.stage(newer, backend.update)  # the same version again: a retry
        assert engine.staged_version == newer
        assert engine.abort(newer)

    def test_a_newer_stage_replaces_the_staged_copy_and_the_older_cannot_be_committed(self, backend: Backend):
        engine, version = backend.engine, backend.engine.version + 1
        engine.stage(version, backend.update)
        engine.stage(version + 1, backend.update)
        assert engine.staged_version == version + 1  # one staged copy at most
        with pytest.raises(WeightSyncError, match=rf"cannot commit version {version}: it was not staged"):
            engine.commit(version)
        engine.commit(version + 1, wait=True, timeout=TIMEOUT)
        assert engine.version == engine.serving_version == version + 1

    def test_committing_the_committed_version_again_is_a_no_op(self, backend: Backend):
        engine, version = backend.engine, backend.engine.version + 1
        engine.stage(version, backend.update)
        engine.commit(version, wait=True, timeout=TIMEOUT)
        assert engine.commit(version, wait=True, timeout=TIMEOUT) == version  # a retry
        assert (engine.version, engine.serving_version, engine.staged_version) == (version, version, None)

    def test_a_version_never_staged_cannot_be_committed(self, backend: Backend):
        engine, version = backend.engine, backend.engine.version
        with pytest.raises(WeightSyncError, match=rf"call stage\({version + 1}, params\) first"):
            engine.commit(version + 1)
        assert engine.version == version

    def test_abort_drops_only_the_staged_copy_it_names(self, backend: Backend):
        engine, version = backend.engine, backend.engine.version + 1
        engine.stage(version, backend.update)
        assert engine.abort(version + 1) is False
        assert engine.staged_version == version
        assert engine.abort(version) is True
        assert engine.abort() is False  # nothing staged
        with pytest.raises(WeightSyncError, match="not staged"):
            engine.commit(version)
        assert engine.version == engine.serving_version == version - 1

    def test_a_refused_stage_keeps_the_staged_copy_and_the_version(self, backend: Backend):
        engine, version = backend.engine, backend.engine.version + 1
        engine.stage(version, backend.update)
        with pytest.raises(backend.refusal):
            engine.stage(version + 1, backend.refused)
        assert engine.staged_version == version and engine.version == version - 1
        assert engine.abort() is True
