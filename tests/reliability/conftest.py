"""Fixtures of the reliability suite.

One fleet (2 workers x 2 simulated CPU devices, on the session's local Ray) serves the whole
package: starting workers costs seconds on a small machine. Its workers are FaultyWorkers (the
product's worker with faults the tests arm; see fault_worker.py). It is synced once at start, so
it serves version 1 (and a version can go backwards). Cases that destroy a service (shutdown,
garbage collection) get small services of their own from `make_small_service`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import rollout

from .harness import FLEET, SMALL_FLEET, engine_params


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: the bounded load run of the reliability suite (small: see test_soak.py)")


@pytest.fixture(scope="package")
def params(tiny_qwen3: Path) -> dict[str, np.ndarray]:
    """The fleet's own weights as a flat engine-layout tree (what a trainer would send)."""
    return engine_params(tiny_qwen3)


@pytest.fixture(scope="package")
def other_params(tiny_qwen3_perturbed: Path) -> dict[str, np.ndarray]:
    """Weights of the same shapes, different values."""
    return engine_params(tiny_qwen3_perturbed)


@pytest.fixture(scope="package")
def shared_fleet(ray_local, tiny_qwen3: Path, params: dict[str, np.ndarray]):
    with rollout.RolloutService(tiny_qwen3, **FLEET) as svc:
        assert svc.sync_weights(params) == 1
        yield svc


@pytest.fixture
def fleet(shared_fleet: rollout.RolloutService):
    """The shared fleet, whole again (no worker down) before each test; faults cleared after."""
    assert shared_fleet.wait_for_workers(timeout=180), f"a worker did not come back: {shared_fleet.status()['workers']}"
    yield shared_fleet
    import ray

    ray.get([handle.clear_faults.remote() for handle in shared_fleet.workers], timeout=60)


@pytest.fixture
def make_small_service(ray_local, tiny_qwen3: Path) -> Callable[[], rollout.RolloutService]:
    """A factory of small services (the case owns the service and must end it)."""
    return lambda: rollout.RolloutService(tiny_qwen3, **SMALL_FLEET)
