"""rollout.coordinator.resend: the one send/re-send path of generate prompts, streams and score parts.

The Route's decisions (budget, which worker next, which errors) are plain Python on a real
Router. The two ways of waiting (`Calls` for threads, `resending` on an event loop) run against
small Ray actors on the session's local Ray that fail the way workers do: their engine closes
(EngineClosedError, a worker failure), they raise something else (not re-sent), or they die.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import ray

from rollout.coordinator.resend import Calls, DiedMidStream, Resends, Route, call_resending, resending
from rollout.coordinator.routing import DEAD, DOWN, UP, Router
from rollout.engine.types import EngineClosedError
from rollout.errors import ServiceClosedError, WorkerUnavailableError


def route(router: Router, downs: list | None = None, *, max_retries: int = 1, pinned: int | None = None) -> Route:
    downs = downs if downs is not None else []
    return Route(router, lambda worker, err, epoch: downs.append((worker, epoch)), cost=10,
                 max_retries=max_retries, name="prompt 3", pinned=pinned)


def died() -> BaseException:
    return ray.exceptions.ActorDiedError()


def engine_closed() -> BaseException:
    return ray.exceptions.RayTaskError("generate", "traceback", EngineClosedError("closed")).as_instanceof_cause()


def fail(r: Route, err: BaseException) -> None:
    """Let `r` judge `err` where a caller would: in the except block of the failed call."""
    try:
        raise err
    except BaseException as caught:  # noqa: BLE001 - handed to the route as a caller would
        r.release()
        r.check_resend(caught)


# -- the Route's decisions (no Ray cluster) --------------------------------------------------------


def test_a_worker_death_reports_the_worker_down_and_the_resend_avoids_it():
    router, downs = Router(2), []
    r = route(router, downs)
    first = r.acquire(timeout=0)
    fail(r, died())
    assert downs == [(first, router.epoch(first))]
    assert r.acquire(timeout=0) != first  # both are up: the other one


def test_the_budget_counts_deaths_and_then_raises_naming_the_request_and_every_failure():
    router = Router(2)
    r = route(router, max_retries=1)
    r.acquire(timeout=0)
    fail(r, died())
    r.acquire(timeout=0)
    with pytest.raises(WorkerUnavailableError, match=r"^prompt 3 failed 2 times as its workers died: .*ray status"):
        fail(r, engine_closed())


def test_sends_that_find_a_worker_restarting_do_not_spend_the_death_budget():
    budget = Resends(max_retries=0)
    assert all(budget.failed(0, ray.exceptions.ActorUnavailableError("restarting", None)) for _ in range(50))
    assert budget.retries_left == 0 and not budget.failed(0, died())


def test_an_error_that_is_not_a_worker_failure_is_raised_as_it_came_and_nothing_goes_down():
    router, downs = Router(2), []
    r = route(router, downs)
    r.acquire(timeout=0)
    err = ray.exceptions.RayTaskError("generate", "traceback", ValueError("bad")).as_instanceof_cause()
    with pytest.raises(ValueError) as info:
        fail(r, err)
    assert info.value is err and downs == [] and router.workers_in(UP) == [0, 1]


def test_release_gives_the_cost_back_once():
    router = Router(1)
    r = route(router)
    r.acquire(timeout=0)
    r.release()
    r.release()
    assert router.snapshot()[0]["outstanding_tokens"] == 0 and router.snapshot()[0]["inflight_requests"] == 0


def test_a_pinned_route_waits_for_its_worker_and_a_send_may_name_another():
    router = Router(2)
    router.mark(1, DOWN)
    r = route(router, pinned=1)
    with pytest.raises(TimeoutError):
        r.acquire(timeout=0)
    assert r.acquire(timeout=0, worker=0) == 0


def test_a_closed_service_and_dead_workers_are_told_apart():
    router = Router(1)
    router.mark(0, DEAD)
    with pytest.raises(WorkerUnavailableError, match=r"^prompt 3: no worker can take the request.*ray status"):
        route(router).acquire(timeout=0)
    router.close()
    with pytest.raises(ServiceClosedError, match=r"^prompt 3: the rollout service was shut down while it ran"):
        route(router).acquire(timeout=0)


def test_on_an_event_loop_acquire_polls_until_a_worker_comes_up():
    router = Router(1)
    router.mark(0, DOWN)

    async def run():
        pending = asyncio.ensure_future(route(router).acquire_async())
        await asyncio.sleep(0.1)
        assert not pending.done()
        router.mark(0, UP)
        return await pending

    assert asyncio.run(run()) == 0


def test_a_call_that_cannot_be_made_raises_and_gives_its_cost_back():
    router = Router(1)

    def start(worker: int):
        raise TypeError("bad arguments")

    with pytest.raises(TypeError, match="bad arguments"):
        asyncio.run(call_resending(route(router), start))
    assert router.snapshot()[0]["inflight_requests"] == 0


# -- sending and waiting, against actors that fail as workers do -------------------------------------


@ray.remote(max_restarts=0)
class Replier:
    """Answers `call(x)` with (its name, x); `arm(kind, times)` makes the next calls fail:
    "closed" (EngineClosedError), "bug" (ValueError) or "die" (the process exits)."""

    def __init__(self, name: int):
        self.name = name
        self.armed: tuple[str, int] = ("", 0)
        self.calls = 0
        self.cancelled = 0

    def arm(self, kind: str, times: int = 1) -> None:
        self.armed = (kind, times)

    def stats(self) -> tuple[int, int]:
        return self.calls, self.cancelled

    def _fault(self) -> None:
        kind, times = self.armed
        if times <= 0:
            return
        self.armed = (kind, times - 1)
        if kind == "die":
            os._exit(1)
        raise EngineClosedError("the engine was shut down") if kind == "closed" else ValueError("a bug")

    async def call(self, x: int, delay: float = 0.0) -> tuple[int, int]:
        self.calls += 1
        self._fault()
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.name, x

    async def stream(self, n: int, fail_after: int = -1, delay: float = 0.0):
        self.calls += 1
        if fail_after < 0:
            self._fault()
        try:
            for i in range(n):
                if i == fail_after:
                    self._fault()
                await asyncio.sleep(delay)
                yield self.name, i
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise


@pytest.fixture
def workers(ray_local):
    handles = [Replier.remote(i) for i in range(2)]
    ray.get([h.stats.remote() for h in handles])
    yield handles
    for h in handles:
        ray.kill(h)


def stats_once_cancelled(worker, timeout_s: float = 30.0) -> tuple[int, int]:
    """The worker's (calls, cancelled calls) once it counted a cancel, or when `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while ray.get(worker.stats.remote())[1] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return ray.get(worker.stats.remote())


def stream_start(handles, n: int, **kwargs):
    return lambda worker: handles[worker].stream.options(num_returns="streaming").remote(n, **kwargs)


def test_calls_answer_each_key_once_and_resend_the_one_whose_engine_closed(workers):
    router, downs = Router(2), []
    ray.get(workers[0].arm.remote("closed"))
    calls: Calls[int] = Calls("generate", "prompts", None)
    for key in range(4):
        calls.send(key, route(router, downs), lambda w, key=key: workers[w].call.remote(key))
    answers = []
    while (done := calls.next()) is not None:
        answers.append(done)
    assert sorted(key for key, _ in answers) == [0, 1, 2, 3]
    assert all(key == x for key, (_, x) in answers)
    assert [worker for worker, _ in downs] == [0]
    assert [s["inflight_requests"] for s in router.snapshot()] == [0, 0]


def test_calls_raise_an_error_that_is_not_a_worker_failure(workers):
    ray.get(workers[0].arm.remote("bug"))
    calls: Calls[int] = Calls("generate", "prompts", None)
    calls.send(0, route(Router(2), pinned=0), lambda w: workers[w].call.remote(0))
    with pytest.raises(ValueError, match="a bug"):
        calls.next()


def test_calls_past_their_deadline_raise_timeout_and_cancel_cancels_on_the_worker(workers):
    router = Router(2)
    calls: Calls[int] = Calls("generate", "prompts", time.monotonic() + 0.5)
    calls.send(0, route(router, pinned=1), lambda w: workers[w].call.remote(0, 30.0))
    with pytest.raises(TimeoutError, match=r"generate did not finish within its timeout \(1 prompts left\)"):
        calls.next()
    calls.cancel()
    assert calls.next() is None and router.snapshot()[1]["inflight_requests"] == 0
    assert stats_once_cancelled(workers[1]) == (1, 1)


def test_a_call_on_a_loop_whose_worker_dies_is_answered_by_the_other(workers):
    router, downs = Router(2), []
    ray.get(workers[0].arm.remote("die"))
    r = route(router, downs)
    assert asyncio.run(call_resending(r, lambda w: workers[w].call.remote(7))) == (1, 7)
    assert [worker for worker, _ in downs] == [0] and router.snapshot()[1]["inflight_requests"] == 0


def test_a_stream_whose_worker_dies_before_its_first_item_is_sent_again_whole(workers):
    ray.get(workers[0].arm.remote("closed"))
    r = route(Router(2))

    async def run():
        return [item async for item in resending(r, stream_start(workers, 3))]

    assert asyncio.run(run()) == [(1, 0), (1, 1), (1, 2)]


def test_a_stream_whose_worker_dies_after_an_item_raises_died_mid_stream_with_the_budget_counted(workers):
    ray.get(workers[0].arm.remote("closed"))
    r = route(Router(2), pinned=0)
    got = []

    async def run():
        async for item in resending(r, stream_start(workers, 3, fail_after=1)):
            got.append(item)  # noqa: PERF401 - keeps what arrived before the failure

    with pytest.raises(DiedMidStream) as info:
        asyncio.run(run())
    assert got == [(0, 0)] and info.value.worker == 0 and isinstance(info.value.cause, EngineClosedError)
    assert r.resends.attempts == 1 and r.resends.retries_left == 0


def test_a_stream_closed_early_is_cancelled_on_its_worker_and_its_cost_released(workers):
    router = Router(2)
    r = route(router, pinned=1)

    async def run():
        stream = resending(r, stream_start(workers, 100, delay=0.05))
        first = await anext(stream)
        await stream.aclose()
        return first

    assert asyncio.run(run()) == (1, 0)
    assert router.snapshot()[1]["inflight_requests"] == 0
    assert stats_once_cancelled(workers[1]) == (1, 1)
