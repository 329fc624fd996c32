"""Scoring on the fleet: the pairs of one `score` call, split over live workers, on one version.

Each part (a run of pairs) is one Ray call to one worker, whose engine scores it on its
committed version (`Engine.score`). A part whose worker died is sent again to another worker
(rollout.coordinator.resend, as generate's prompts are).
Parts can come back from different versions when a sync commits while they run (workers commit
one after the other); the parts of an older version are then sent again to a worker that
reported the newest one (versions only go forward), until every part has the same version. The
result is `Scores(logprobs, weight_version)` for the whole call; with hidden layers asked for,
each part's hidden states come back with its logprobs and are put in input order the same way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from rollout.coordinator.fleet_view import FleetView
from rollout.coordinator.resend import Calls, Route
from rollout.scores import Scores

_MIN_PART = 8  # pairs: smaller calls are not worth a second worker
_MAX_VERSION_ROUNDS = 16  # re-sends for version agreement (each needs a sync committing meanwhile)


@dataclasses.dataclass
class _Part:
    rows: list[int]  # indices into the caller's pairs
    route: Route
    call: Callable[[int], ray.ObjectRef]  # worker index -> its score call
    result: Scores | None = None

    def scores(self) -> Scores:
        """The part's result, once collected."""
        if self.result is None:
            raise RuntimeError(f"score: the part of rows {self.rows[:3]}... has no result yet (a dispatch bug)")
        return self.result


def split(n: int, live: int) -> list[list[int]]:
    """Contiguous parts of range(n), one per live worker at most, each >= _MIN_PART pairs.

    >>> split(20, 2), split(5, 4), split(0, 2)
    ([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]], [[0, 1, 2, 3, 4]], [])
    """
    if n == 0:
        return []
    parts = max(1, min(live, n // _MIN_PART))
    bounds = [n * k // parts for k in range(parts + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(parts)]


def score_on_fleet(
    fleet: FleetView,
    *,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    temperature: float,
    timeout: float | None,
    min_version: int = 0,
    routes: Sequence[Any] | None = None,
    hidden_layers: Sequence[int] | None = None,
) -> Scores:
    """Score validated token-id pairs on the fleet; every logprob comes from one version
    (>= `min_version`, the fleet's committed version when the call started). `routes`
    (validated, one per pair): the experts to replay (routing replay), sent with their pairs.
    `hidden_layers` (validated layer indices): every part also returns the residual stream at
    those layers (Scores.hidden_states)."""
    # only what was asked for is sent: the plain call is the one every backend that scores takes
    extra: dict[str, Any] = {} if hidden_layers is None else {"return_hidden_states": list(hidden_layers)}

    def part(rows: list[int]) -> _Part:
        cost = sum(len(prompts[i]) + len(completions[i]) for i in rows)
        route = fleet.route(cost=cost, name=f"score: a part of {len(rows)} pairs")
        ps, cs = [prompts[i] for i in rows], [completions[i] for i in rows]
        kwargs = extra if routes is None else {**extra, "routed_experts": [routes[i] for i in rows]}
        return _Part(rows, route, lambda worker: fleet.handles[worker].score.remote(ps, cs, temperature, **kwargs))

    parts = [part(rows) for rows in split(len(prompts), max(1, len(fleet.live_workers())))]
    if not parts:
        return Scores((), min_version, None if hidden_layers is None else ())
    calls: Calls[int] = Calls("score", "parts", None if timeout is None else time.monotonic() + timeout)

    def collect() -> None:
        while (done := calls.next()) is not None:
            parts[done[0]].result = done[1]

    try:
        for k, p in enumerate(parts):
            calls.send(k, p.route, p.call)
        collect()
        for _ in range(_MAX_VERSION_ROUNDS):
            newest = max(p.scores().weight_version for p in parts)
            if newest < min_version:  # a worker is marked up only once it caught up: never expected
                raise RuntimeError(
                    f"score: the workers answered on version {newest}, older than version {min_version} "
                    "committed when the call started; retry the call and report this"
                )
            stale = [k for k, p in enumerate(parts) if p.scores().weight_version != newest]
            if not stale:
                break
            at_newest = next(p.route.worker for p in parts if p.scores().weight_version == newest)
            for k in stale:
                calls.send(k, parts[k].route, parts[k].call, worker=at_newest)
            collect()
        else:
            raise RuntimeError(
                f"score: parts kept coming back from different versions over {_MAX_VERSION_ROUNDS} rounds "
                "(a sync committed during each); retry the call"
            )
    except BaseException:
        calls.cancel()
        raise
    logprobs: list[Any] = [None] * len(prompts)
    hidden: list[Any] = [None] * len(prompts)
    for p in parts:
        for row, values in zip(p.rows, p.scores().logprobs):
            logprobs[row] = values
        if hidden_layers is not None:
            states = p.scores().hidden_states
            if states is None or len(states) != len(p.rows):
                raise RuntimeError(
                    f"score: a worker returned no hidden states for a part of {len(p.rows)} pairs although "
                    f"layers {list(hidden_layers)} were asked for (a backend bug); report this"
                )
            for row, values in zip(p.rows, states):
                hidden[row] = values
    return Scores(
        tuple(logprobs), parts[0].scores().weight_version, None if hidden_layers is None else tuple(hidden)
    )
