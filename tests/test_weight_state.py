"""The one weight state machine (rollout.engine.weight_state): its contract (tests/weight_contract.py)
on the smallest backend made of it (a dict of arrays as the swap target, a model thread that
applies each swap) and on the native engine; the sglang-jax backend runs the same contract in
tests/sglang. Then what only the state machine itself shows: swap policies at a step boundary,
a stage overtaken by a commit, the snapshot, and waiting for a swap."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from weight_contract import Backend, WeightStateContract

from rollout.engine import EngineConfig
from rollout.engine.types import WeightSyncError
from rollout.engine.weight_state import WeightState
from rollout.weights.loader import iter_tensors
from rollout.weights.spec import SpecMismatchError

Arrays = dict[str, np.ndarray]


class ArrayTarget:
    """The smallest swap target: host arrays as parameters; one derived leaf (their sum)."""

    def __init__(self, params: Arrays):
        self.params = params
        self.derived = self.derive(params)

    def derive(self, params: Arrays) -> dict[str, Any]:
        return {"total": np.float64(sum(float(a.sum()) for a in params.values()))}

    def set_params(self, params: Arrays, derived: dict[str, Any] | None = None) -> None:
        self.params, self.derived = params, derived if derived is not None else self.derive(params)


class ArrayBackend:
    """A backend made of WeightState and nothing else of rollout's: a model thread applies each
    committed swap as its policy allows (drain: once no sequence is `running`)."""

    def __init__(self, params: Arrays):
        self._lock = threading.Condition()
        self.target = ArrayTarget(params)
        self.running = 0  # sequences "decoding": a drain swap waits for 0
        self.closed = False
        self.weights: WeightState[Arrays] = WeightState(self._lock, self.target, stopped=lambda: self.closed)
        self._thread = threading.Thread(target=self._loop, name="array-backend", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        return self.weights.committed

    @property
    def serving_version(self) -> int:
        return self.weights.serving

    @property
    def staged_version(self) -> int | None:
        return self.weights.staged_version

    def stage(self, version: int, params: Arrays) -> Any:
        def build() -> Arrays:
            if set(params) != set(self.target.params):
                raise SpecMismatchError(f"expected leaves {sorted(self.target.params)}, got {sorted(params)}")
            return {path: np.array(a) for path, a in params.items()}  # owned copies

        return self.weights.stage(version, build)

    def commit(self, version: int, policy: str | None = None, *, wait: bool = False, timeout: float | None = None) -> int:
        return self.weights.commit(version, policy or "drain", wait=wait, timeout=timeout)

    def abort(self, version: int | None = None) -> bool:
        return self.weights.abort(version)

    def set_running(self, n: int) -> None:
        with self._lock:
            self.running = n
            self._lock.notify_all()

    def _swappable(self) -> bool:
        pending = self.weights.pending
        return pending is not None and (pending.policy != "drain" or self.running == 0)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self.closed or self._swappable())
                if self.closed:
                    return
                swap = self.weights.take_swap(running=self.running > 0)
            assert swap is not None
            self.weights.apply(swap)

    def shutdown(self) -> None:
        with self._lock:
            self.closed = True
            self._lock.notify_all()
        self._thread.join(timeout=10)


def arrays(value: float) -> Arrays:
    return {"embed": np.full((4, 2), value, np.float32), "norm": np.full((2,), value, np.float32)}


@pytest.fixture(scope="module")
def array_backend():
    backend = ArrayBackend(arrays(0.0))
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def native_engine(tiny_qwen3):
    from rollout.engine.native.engine import Engine

    with Engine(tiny_qwen3, EngineConfig(max_batch=2, max_seq_len=64)) as engine:
        yield engine


@pytest.fixture(params=["arrays", "native"])
def backend(request, tiny_qwen3) -> Backend:
    if request.param == "arrays":
        update = arrays(1.0)
        return Backend(request.getfixturevalue("array_backend"), update, {"embed": update["embed"]}, SpecMismatchError)
    update = dict(iter_tensors(tiny_qwen3))
    refused = {name: a for name, a in update.items() if name != "model.norm.weight"}
    return Backend(request.getfixturevalue("native_engine"), update, refused, SpecMismatchError)


class TestWeightStateContract(WeightStateContract):
    pass


# -- the state machine itself -------------------------------------------------------------------


def weight_state(stopped: bool = False) -> WeightState[Arrays]:
    """A WeightState with no model thread: nothing is swapped in unless a test applies it."""
    return WeightState(threading.Condition(), ArrayTarget(arrays(0.0)), stopped=lambda: stopped)


def committed(weights: WeightState[Arrays], version: int, policy: str) -> WeightState[Arrays]:
    weights.stage(version, lambda: arrays(float(version)))
    weights.commit(version, policy)
    return weights


def test_a_drain_swap_is_taken_only_once_nothing_runs():
    weights = committed(weight_state(), 1, "drain")
    assert weights.take_swap(running=True) is None
    swap = weights.take_swap(running=False)
    assert swap is not None and swap.weights.version == 1 and weights.pending is None


@pytest.mark.parametrize("policy", ["recompute", "continue"])
def test_recompute_and_continue_swaps_are_taken_while_sequences_run(policy):
    weights = committed(weight_state(), 1, policy)
    swap = weights.take_swap(running=True)
    assert swap is not None and swap.policy == policy


def test_a_drain_swap_waits_on_a_backend_until_its_running_sequences_finish(array_backend):
    array_backend.set_running(1)
    version = array_backend.version + 1
    array_backend.stage(version, arrays(2.0))
    array_backend.commit(version)  # drain
    with pytest.raises(TimeoutError, match=f"version {version} was committed but not swapped in within 0.2s"):
        array_backend.weights.wait_serving(version, timeout=0.2)
    array_backend.set_running(0)
    array_backend.weights.wait_serving(version, timeout=30)
    assert float(array_backend.target.params["norm"][0]) == 2.0


def test_a_stage_overtaken_by_a_commit_of_a_newer_version_is_refused():
    weights = weight_state()

    def build_while_a_newer_version_commits() -> Arrays:
        committed(weights, 2, "drain")
        return arrays(1.0)

    with pytest.raises(WeightSyncError, match="version 1 was overtaken by the commit of version 2"):
        weights.stage(1, build_while_a_newer_version_commits)
    assert weights.staged is None and weights.committed == 2


def test_a_failing_build_changes_nothing():
    weights = committed(weight_state(), 1, "drain")
    weights.stage(2, lambda: arrays(2.0))

    def fail() -> Arrays:
        raise RuntimeError("the checkpoint is unreadable")

    with pytest.raises(RuntimeError, match="unreadable"):
        weights.stage(3, fail)
    assert (weights.committed, weights.staged_version, weights.pending.weights.version) == (1, 2, 1)


def test_the_snapshot_is_the_committed_copy_before_its_swap_and_the_target_after():
    weights = committed(weight_state(), 1, "drain")
    version, params, derived = weights.snapshot()
    assert version == 1 and float(params["norm"][0]) == 1.0 and float(derived["total"]) == 10.0
    weights.apply(weights.take_swap(running=False))
    version, params, _ = weights.snapshot()
    assert (version, weights.serving, weights.swaps) == (1, 1, 1) and params is weights._target.params


def test_waiting_for_a_swap_ends_when_the_backend_stops():
    weights = committed(weight_state(stopped=True), 1, "drain")
    weights.wait_serving(1, timeout=None)  # returns: a stopped backend swaps nothing in
    assert weights.serving == 0
