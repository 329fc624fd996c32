"""FleetView: the running fleet as the driver's request paths and the weight sync see it.

The service builds one value once its workers are ready and hands that same value to dispatch
(generate), streaming (generate_stream, agenerate), score_dispatch (score) and sync
(sync_weights); none of them reaches back into the service.

    fleet = FleetView(handles, router, registry, spec, max_retries=3)
    route = fleet.route(cost=138, name="prompt 0")   # one request's sends (rollout.coordinator.resend)
    fleet.live_workers()                             # the workers that are up, e.g. [0, 1]
    fleet.worker_down(1, err)                        # routed around until the health probe brings it back

The view is frozen and holds no state of its own: liveness and load are the router's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

from rollout.coordinator.resend import Route
from rollout.coordinator.routing import DOWN, UP, Router
from rollout.errors import describe_error
from rollout.weights.spec import ParamSpec

# The service's logger: "worker_down" lines are where they always were.
log = logging.getLogger("rollout.coordinator.service")


@dataclasses.dataclass(frozen=True)
class FleetView:
    """What every fleet request and sync needs: the workers, their routing, the registry."""

    handles: Sequence[Any]  # worker actor handles (rollout.protocol.WorkerCalls), by index
    router: Router  # liveness and outstanding work per worker
    registry: Any  # UpdateRegistry actor handle (rollout.coordinator.registry)
    spec: ParamSpec  # the engines' parameter spec (every worker holds the same)
    max_retries: int  # FleetConfig.max_request_retries: worker deaths a request survives

    @property
    def num_workers(self) -> int:
        return len(self.handles)

    def live_workers(self) -> list[int]:
        """The workers that take requests and syncs now (up)."""
        return self.router.workers_in(UP)

    def worker_down(self, index: int, err: BaseException, epoch: int | None = None) -> None:
        """A call to worker `index` failed as the worker died or restarted: route around it until
        the service's health probe brings it back. `epoch`: the worker's router epoch when the
        call was sent (a failure from an earlier incarnation does not take it down again)."""
        if self.router.mark(index, DOWN, epoch):
            log.warning(json.dumps({"event": "worker_down", "worker": index, "error": describe_error(err)}))

    def route(self, *, cost: int, name: str, pinned: int | None = None, max_retries: int | None = None) -> Route:
        """One request's way to the fleet (rollout.coordinator.resend.Route): `cost` in tokens,
        `name` the subject of its errors, `pinned` a worker to send every attempt to;
        `max_retries` defaults to the fleet's."""
        retries = self.max_retries if max_retries is None else max_retries
        return Route(self.router, self.worker_down, cost=cost, max_retries=retries, name=name, pinned=pinned)
