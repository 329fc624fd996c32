"""Sends and re-sends: how every fleet request (a generate prompt, a stream, a score part) reaches
a worker and goes again when its worker dies. Dispatch, streaming and score_dispatch all send
through here; none has a retry loop of its own.

A `Route` is one request's way to the fleet. It picks a worker (the least-loaded live one, or a
pinned one), counts the request's cost there while its call runs, and when the call fails
decides what comes next:

- the worker died or is restarting, or its engine closed (`is_worker_failure`): the worker is
  reported down and the request may go again, to another worker if one is up, within its budget
  (`Resends`: `max_retries` deaths, and up to _MAX_UNAVAILABLE sends that found the worker
  restarting). Once the budget is spent: WorkerUnavailableError listing every failure.
- anything else (a bug, a bad request that slipped past validation): raised as it came.

A failed call produced nothing its caller saw (a stream is re-sent only before its first item),
so every request is answered exactly once.

Two ways to wait on calls, both through Routes:

    calls = Calls("generate", "prompts", deadline)      # threads: many calls, collected as they finish
    calls.send(key, route, lambda worker: handle[worker].generate.remote(...))
    key, result = calls.next()                          # re-sends failed calls by itself

    async for item in resending(route, start):          # an event loop: one request's results
        ...                                             # (one for a call, many for a stream)

`resending` re-sends a stream while nothing of it was delivered; when its worker dies after
that, it raises `DiedMidStream` (the budget counted), and the caller continues what is
unfinished (rollout.coordinator.streaming continues each unfinished sample on another worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, Generic, TypeVar

import ray

from rollout.coordinator.routing import Router
from rollout.engine.types import EngineClosedError
from rollout.errors import ServiceClosedError, WorkerUnavailableError, describe_error

_MAX_UNAVAILABLE = 100  # re-sends to restarting workers (each waits for a worker to be up)
_POLL_S = 0.05  # on an event loop, while no worker is up

WorkerDown = Callable[[int, BaseException, int | None], None]  # (worker, error, its epoch when sent)
K = TypeVar("K")


def is_worker_failure(err: BaseException) -> bool:
    """Errors after which a request is re-sent: the worker (or its engine) went away."""
    if isinstance(err, ray.exceptions.RayActorError):
        return True
    if isinstance(err, ray.exceptions.RayTaskError):
        return isinstance(getattr(err, "cause", None), EngineClosedError)
    return False


@dataclasses.dataclass
class Resends:
    """The re-send budget of one request: `max_retries` sends that ended with the worker dead or
    its engine closed, and up to _MAX_UNAVAILABLE sends that found the worker restarting (nothing
    of such an attempt survives; each waits for a worker to be up).

    >>> budget = Resends(max_retries=1)
    >>> budget.failed(0, RuntimeError("gone")), budget.failed(1, RuntimeError("gone again"))
    (True, False)
    >>> budget.failures
    ['worker 0: RuntimeError: gone', 'worker 1: RuntimeError: gone again']
    """

    max_retries: int
    attempts: int = 0
    unavailable: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def failed(self, worker: int, err: BaseException) -> bool:
        """Count a send to `worker` that failed with `err`; True if the request may go again."""
        self.failures.append(f"worker {worker}: {describe_error(err)}")
        if isinstance(err, ray.exceptions.ActorUnavailableError):
            self.unavailable += 1
        else:
            self.attempts += 1
        return self.attempts <= self.max_retries and self.unavailable <= _MAX_UNAVAILABLE

    @property
    def retries_left(self) -> int:
        return max(0, self.max_retries - self.attempts)


class Route:
    """One request's sends to the fleet (see the module docstring). `name` is the subject of its
    errors ("prompt 3", "the request", "score: a part of 8 pairs"); `pinned` sends every attempt
    to that worker (waiting for it to be up)."""

    def __init__(
        self, router: Router, worker_down: WorkerDown, *, cost: int, max_retries: int, name: str,
        pinned: int | None = None,
    ):
        self._router = router
        self._worker_down = worker_down
        self.cost = cost
        self.name = name
        self.pinned = pinned
        self.resends = Resends(max_retries)
        self.worker: int | None = None  # the worker of the latest send
        self._epoch = 0  # that worker's router epoch when sent
        self._holding = False  # its cost is counted on that worker
        self._avoid: frozenset[int] = frozenset()  # the worker that failed the latest send

    def acquire(self, timeout: float | None, *, worker: int | None = None) -> int:
        """Pick the worker of the next send (`worker`, or the pinned one, or the least-loaded
        live one other than the one that just failed) and count the cost there; waits up to
        `timeout` s while none is up (then TimeoutError)."""
        try:
            index = self._router.acquire(self.cost, worker=self.pinned if worker is None else worker,
                                         avoid=self._avoid, timeout=timeout)
        except LookupError as err:
            raise self._unroutable(err) from err
        self.worker, self._epoch, self._holding = index, self._router.epoch(index), True
        return index

    async def acquire_async(self) -> int:
        """`acquire` on an event loop: polls while no worker is up (a thread blocked in the router
        would take a worker's share after its caller was cancelled, and never give it back)."""
        while True:
            try:
                return self.acquire(timeout=0)
            except TimeoutError:
                await asyncio.sleep(_POLL_S)

    def release(self) -> None:
        """The call ended (or was given up): its cost no longer counts on its worker."""
        if self._holding and self.worker is not None:
            self._holding = False
            self._router.release(self.worker, self.cost)

    def check_resend(self, err: BaseException) -> None:
        """In the except block of a failed call: return if the request may go again (to another
        worker than this one, if one is up); raise `err` if it is not a worker failure, and
        WorkerUnavailableError once the re-send budget is spent."""
        if not is_worker_failure(err):
            raise err
        worker = self.worker if self.worker is not None else -1
        self._worker_down(worker, err, self._epoch)
        self._avoid = frozenset([worker])
        if not self.resends.failed(worker, err):
            failures = self.resends.failures
            raise WorkerUnavailableError(
                f"{self.name} failed {len(failures)} times as its workers died: {failures}; "
                "check `ray status` and the worker logs"
            ) from err

    def _unroutable(self, err: LookupError) -> Exception:
        if self._router.closed:
            return ServiceClosedError(
                f"{self.name}: the rollout service was shut down while it ran; create a new one "
                "(rollout.init) and resubmit"
            )
        return WorkerUnavailableError(f"{self.name}: {err}; check `ray status`")


def _cancel(call: Any) -> None:
    try:
        ray.cancel(call)  # the worker cancels the engine request
    except Exception:  # noqa: BLE001 - already finished or its worker is gone
        pass


class Calls(Generic[K]):
    """Calls in flight for a thread that blocks (generate, score): each sent through its Route
    and keyed by the caller, collected as they finish; a call whose worker died is sent again by
    itself. `what` and `unit` name the work in a timeout's message ("generate", "prompts")."""

    def __init__(self, what: str, unit: str, deadline: float | None):
        self._what, self._unit = what, unit
        self._deadline = deadline
        self._pending: dict[ray.ObjectRef, tuple[K, Route, Callable[[int], ray.ObjectRef]]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def send(self, key: K, route: Route, call: Callable[[int], ray.ObjectRef], *, worker: int | None = None) -> None:
        """Send `call(worker index)` through `route` (to `worker` this once, if given)."""
        index = route.acquire(self._remaining(), worker=worker)
        try:
            ref = call(index)
        except BaseException:
            route.release()
            raise
        self._pending[ref] = (key, route, call)

    def next(self) -> tuple[K, Any] | None:
        """Block until a call finishes: (its key, its result); None when nothing is in flight
        (all collected, or cancelled meanwhile). A failed call is re-sent (see
        Route.check_resend) or its error raised; TimeoutError past the deadline."""
        while self._pending:
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=self._remaining())
            if not ready:
                raise TimeoutError(
                    f"{self._what} did not finish within its timeout ({len(self._pending)} {self._unit} left)"
                )
            entry = self._pending.pop(ready[0], None)
            if entry is None:
                continue  # cancelled meanwhile
            key, route, call = entry
            route.release()
            try:
                return key, ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - check_resend raises all but a worker failure
                route.check_resend(err)
            self.send(key, route, call)
        return None

    def cancel(self) -> None:
        """Give up on the calls in flight (best effort: their workers stop them)."""
        pending, self._pending = self._pending, {}
        for ref, (_, route, _) in pending.items():
            route.release()
            _cancel(ref)

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


class DiedMidStream(Exception):
    """A stream's worker died after part of its output was delivered: the stream is not re-sent
    (what was delivered stands); its caller may continue what is unfinished elsewhere."""

    def __init__(self, worker: int, cause: BaseException):
        super().__init__(f"worker {worker} died after part of the stream was delivered ({describe_error(cause)})")
        self.worker = worker
        self.cause = cause


async def resending(route: Route, start: Callable[[int], Any]) -> AsyncGenerator[Any, None]:
    """One request's results on an event loop: `start(worker)` makes the call, a Ray ObjectRef
    (one result) or a streaming ObjectRefGenerator (one result per item). A call whose worker
    dies is re-sent while nothing of it was yielded (Route.check_resend), DiedMidStream after.
    Closing the iteration (or cancelling its task) before the call ended cancels it on its worker.
    """
    while True:
        worker = await route.acquire_async()
        call: Any = None
        delivered = ended = False
        try:
            call = start(worker)
            if isinstance(call, ray.ObjectRef):
                result = await call
                delivered = ended = True
                yield result
            else:
                async for ref in call:
                    item = await ref
                    delivered = True
                    yield item
                ended = True
            return
        except Exception as err:
            ended = True
            route.check_resend(err)  # raises unless the request may go again
            if delivered:
                raise DiedMidStream(worker, err) from err
        finally:
            route.release()
            if not ended and call is not None:  # the caller stopped early: stop the request on its worker
                _cancel(call)


async def call_resending(route: Route, start: Callable[[int], ray.ObjectRef]) -> Any:
    """The result of one call (`start(worker)`, an ObjectRef), re-sent as `resending` does."""
    async with contextlib.aclosing(resending(route, start)) as results:
        async for result in results:
            return result
    raise RuntimeError(f"{route.name}: the call ended without a result (a resend bug)")
