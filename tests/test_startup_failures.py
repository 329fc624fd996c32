"""Start-up that cannot succeed fails fast and says why (rollout.coordinator.startup).

Workers whose constructor dies (os._exit, as a process killed for memory or crashing does) or
raises, on a real local Ray: `RolloutService` raises WorkerStartError with the cause and a hint
after `start_attempts` failed starts, long before `ready_timeout_s`, and leaves no worker
restarting behind it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytest
import ray

import rollout
from rollout.errors import WorkerStartError
from rollout.worker.actor import RolloutWorker

pytestmark = pytest.mark.ray

# Worker processes cannot import the tests: ship this module's code with the actor classes.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# ready_timeout_s far above what the failures take: hitting it would raise PlacementError instead
CONFIG = dict(num_workers=1, devices_per_worker=1, accelerator="cpu", max_batch=2, max_seq_len=64,
              ready_timeout_s=600.0, start_attempts=2)


class DiesWhileStarting(RolloutWorker):
    """Its process exits while 'building its engine', every time Ray starts it."""

    def __init__(self, *args: Any, **kwargs: Any):
        print("test engine: allocating the KV cache failed (simulated)", file=sys.stderr, flush=True)
        os._exit(3)


class RaisesWhileStarting(RolloutWorker):
    def __init__(self, *args: Any, **kwargs: Any):
        raise RuntimeError("test engine: the checkpoint does not fit (simulated)")


def _restarting_or_alive(class_name: str) -> list[str]:
    from ray._private import state

    return [a["State"] for a in state.actors().values() if a["ActorClassName"].endswith(class_name)
            and a["State"] != "DEAD"]


def test_a_worker_that_dies_at_every_start_fails_init_with_the_cause_and_a_hint(ray_local, tiny_qwen3):
    with pytest.raises(WorkerStartError) as caught:
        rollout.RolloutService(tiny_qwen3, worker_class=DiesWhileStarting, **CONFIG)
    message = str(caught.value)
    assert "worker 0 failed to start 2 time(s)" in message
    assert "allocating the KV cache failed (simulated)" in message  # the dead process's stderr
    assert "lower max_batch or max_seq_len" in message and "max_batch=2" in message
    # the coordinator killed it: Ray does not go on restarting it
    deadline = time.monotonic() + 60
    while _restarting_or_alive("DiesWhileStarting") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _restarting_or_alive("DiesWhileStarting") == []


def test_a_worker_whose_constructor_raises_fails_init_with_its_error_and_a_hint(ray_local, tiny_qwen3):
    with pytest.raises(WorkerStartError) as caught:
        rollout.RolloutService(tiny_qwen3, worker_class=RaisesWhileStarting, **CONFIG)
    message = str(caught.value)
    assert "worker 0 failed to start: its constructor raised" in message
    assert "RuntimeError: test engine: the checkpoint does not fit (simulated)" in message
    assert "lower max_batch or max_seq_len" in message
