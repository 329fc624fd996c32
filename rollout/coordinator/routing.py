"""Routing: each prompt (with all its n samples) goes to the live worker with the least work.

Work is counted in tokens a request may still cost: prompt length + max_tokens x n. The router
only keeps counters and liveness; it never talks to Ray, so it is tested as plain Python.

    router = Router(num_workers=2)
    w = router.acquire(cost=request_cost(prompt_len=10, max_tokens=32, n=4))   # -> 0
    ...
    router.release(w, cost)

A worker is "up" (takes requests), "down" (died or restarting: the coordinator probes it and
brings it back once it serves the fleet's version) or "dead" (restarts exhausted).
"""

from __future__ import annotations

import threading
import time

UP, DOWN, DEAD = "up", "down", "dead"


def request_cost(prompt_len: int, max_tokens: int, n: int) -> int:
    """Tokens a request may still cost its worker.

    >>> request_cost(prompt_len=10, max_tokens=32, n=4)
    138
    """
    return prompt_len + max_tokens * n


class Router:
    """Thread-safe least-outstanding-work routing over workers that may go down and come back."""

    def __init__(self, num_workers: int):
        self._cond = threading.Condition()
        self._state = [UP] * num_workers
        self._outstanding = [0] * num_workers  # tokens of requests in flight
        self._inflight = [0] * num_workers  # requests in flight
        self._routed = [0] * num_workers  # requests ever routed
        self._epoch = [0] * num_workers  # bumped each time a worker comes (back) up
        self._closed = False

    @property
    def num_workers(self) -> int:
        return len(self._state)

    def acquire(
        self,
        cost: int,
        *,
        worker: int | None = None,
        avoid: frozenset[int] = frozenset(),
        timeout: float | None = None,
    ) -> int:
        """Pick a worker for a request of `cost` and count it as outstanding there.

        `worker` pins the request to one worker (waiting for it to be up). Otherwise the up
        worker with the least outstanding work, preferring workers not in `avoid` (e.g. one
        that just failed this request). Waits up to `timeout` s while no worker is up; raises
        LookupError if every candidate is dead, TimeoutError if none came up in time.

        >>> r = Router(3); r.acquire(10), r.acquire(5), r.acquire(1), r.acquire(1)
        (0, 1, 2, 2)
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise LookupError("the router is closed (the service was shut down)")
                candidates = [worker] if worker is not None else range(len(self._state))
                if all(self._state[i] == DEAD for i in candidates):
                    raise LookupError(f"no worker can take the request: worker(s) {list(candidates)} are dead")
                up = [i for i in candidates if self._state[i] == UP]
                preferred = [i for i in up if i not in avoid] or up
                if preferred:
                    best = min(preferred, key=lambda i: (self._outstanding[i], self._inflight[i], i))
                    self._outstanding[best] += cost
                    self._inflight[best] += 1
                    self._routed[best] += 1
                    return best
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no worker came up within {timeout}s (states: {self._state})")
                self._cond.wait(remaining)

    def release(self, worker: int, cost: int) -> None:
        with self._cond:
            self._outstanding[worker] -= cost
            self._inflight[worker] -= 1

    def mark(self, worker: int, state: str, epoch: int | None = None) -> bool:
        """Set a worker's state; True if it changed. A dead worker stays dead.

        With `epoch` (the worker's epoch when a failed request was sent), a failure from
        before the worker last came up is stale and does not take the worker down again.
        """
        if state not in (UP, DOWN, DEAD):
            raise ValueError(f"state={state!r}: expected {UP!r}, {DOWN!r} or {DEAD!r}")
        with self._cond:
            if self._state[worker] == state or self._state[worker] == DEAD:
                return False
            if epoch is not None and epoch != self._epoch[worker]:
                return False
            self._state[worker] = state
            if state == UP:
                self._epoch[worker] += 1
            self._cond.notify_all()
            return True

    def epoch(self, worker: int) -> int:
        return self._epoch[worker]

    def workers_in(self, state: str) -> list[int]:
        with self._cond:
            return [i for i, s in enumerate(self._state) if s == state]

    def wait_until(self, predicate, timeout: float | None) -> bool:
        """Wait until `predicate(states)` holds (states: list of per-worker states)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(list(self._state)), timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def snapshot(self) -> list[dict[str, int | str]]:
        with self._cond:
            return [
                {"state": s, "outstanding_tokens": o, "inflight_requests": f, "routed_requests": r}
                for s, o, f, r in zip(self._state, self._outstanding, self._inflight, self._routed)
            ]
