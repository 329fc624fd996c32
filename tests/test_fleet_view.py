"""rollout.coordinator.fleet_view: the one view of the fleet that generate, streams, score and the
sync are given. Plain Python on a real Router (no Ray started)."""

from __future__ import annotations

import pytest
import ray

from rollout.coordinator.fleet_view import FleetView
from rollout.coordinator.routing import DOWN, UP, Router
from rollout.weights.spec import spec_of_leaves

SPEC = spec_of_leaves([("w", (4,), "float32")])


def fleet(num_workers: int = 3, max_retries: int = 2) -> FleetView:
    return FleetView(handles=tuple(range(num_workers)), router=Router(num_workers), registry=None, spec=SPEC,
                     max_retries=max_retries)


def test_a_worker_reported_down_leaves_the_live_workers():
    view = fleet()
    view.worker_down(1, ray.exceptions.ActorDiedError())
    assert view.live_workers() == [0, 2]
    assert view.router.snapshot()[1]["state"] == DOWN


def test_a_failure_from_an_earlier_incarnation_does_not_take_a_worker_down_again():
    view = fleet(num_workers=1)
    epoch = view.router.epoch(0)  # the call was sent to the first incarnation
    view.worker_down(0, ray.exceptions.ActorDiedError(), epoch)
    view.router.mark(0, UP)  # it came back
    view.worker_down(0, ray.exceptions.ActorDiedError(), epoch)  # a second call of the old incarnation
    assert view.live_workers() == [0]


def test_a_route_takes_the_fleet_retry_budget_unless_given_its_own():
    view = fleet(max_retries=2)
    assert view.route(cost=10, name="prompt 0").resends.max_retries == 2
    assert view.route(cost=10, name="a continued sample", max_retries=0).resends.max_retries == 0


def test_a_route_reports_its_failed_worker_down_through_the_view():
    view = fleet(num_workers=2)
    route = view.route(cost=10, name="prompt 0", pinned=1)
    assert route.acquire(timeout=0) == 1
    route.release()
    try:
        raise ray.exceptions.ActorDiedError()
    except ray.exceptions.ActorDiedError as err:
        route.check_resend(err)  # may go again: the budget allows 2
    assert view.live_workers() == [0]


def test_the_view_is_frozen():
    view = fleet()
    with pytest.raises(AttributeError):
        view.max_retries = 5  # type: ignore[misc]
