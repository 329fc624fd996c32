"""Dispatch: the requests of one generate call, routed, re-sent when their worker dies, collected.

Each prompt (with its n samples) is one Ray call to one worker. A call that fails because its
worker died or restarted (or its engine crashed) is sent again to another live worker (or to
the same one once it is back, when pinned); its first attempt produced nothing the caller sees,
so every prompt is returned exactly once. Other errors (a bug, a bad request that slipped past
validation) propagate to the caller.

`GenerationStream` yields completions as their prompts finish: a plain iterator for threads, an
async iterator for asyncio trainers (see `RolloutService.generate_async`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Self

import ray

from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion, EngineClosedError
from rollout.errors import ServiceClosedError, WorkerUnavailableError, describe_error
from rollout.routing import Router, request_cost

_MAX_UNAVAILABLE = 100  # re-sends to restarting workers (each waits for a worker to be up)


@dataclasses.dataclass
class Resends:
    """The re-send budget of one request (generate, stream or score part): `max_retries` sends that
    ended with the worker dead or its engine closed, and up to _MAX_UNAVAILABLE sends that found
    the worker restarting (nothing of such an attempt survives; each waits for a worker to be up)."""

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


@dataclasses.dataclass
class _Request:
    index: int  # position in the caller's prompt list
    ids: list[int]
    cost: int
    resends: Resends
    worker: int = -1
    epoch: int = 0  # the worker's router epoch when sent


def is_worker_failure(err: BaseException) -> bool:
    """Errors after which the request is re-sent: the worker (or its engine) went away."""
    if isinstance(err, ray.exceptions.RayActorError):
        return True
    if isinstance(err, ray.exceptions.RayTaskError):
        return isinstance(getattr(err, "cause", None), EngineClosedError)
    return False


class Dispatch:
    def __init__(
        self,
        *,
        handles: Sequence[Any],
        router: Router,
        worker_down: Callable[[int, BaseException, int | None], None],
        prompts: Sequence[list[int]],
        sampling: SamplingParams,
        return_logprobs: bool,
        worker: int | None,
        timeout: float | None,
        max_retries: int,
    ):
        self._handles = handles
        self._router = router
        self._worker_down = worker_down
        self._sampling = sampling
        self._return_logprobs = return_logprobs
        self._worker = worker
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._max_retries = max_retries
        self._pending: dict[ray.ObjectRef, _Request] = {}
        self._lock = threading.Lock()
        self.num_prompts = len(prompts)
        try:
            for index, ids in enumerate(prompts):
                cost = request_cost(len(ids), sampling.max_tokens, sampling.n)
                self._send(_Request(index, ids, cost, Resends(self._max_retries)))
        except BaseException:
            self.cancel()
            raise

    @property
    def done(self) -> bool:
        return not self._pending

    def next_group(self) -> list[Completion]:
        """Block until some prompt finishes; its n completions. StopIteration when all are out."""
        with self._lock:
            while self._pending:
                ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=self._remaining())
                if not ready:
                    self.cancel()
                    raise TimeoutError(f"generate did not finish within its timeout ({len(self._pending)} prompts left)")
                ref = ready[0]
                request = self._pending.pop(ref, None)
                if request is None:
                    continue  # cancelled meanwhile
                self._router.release(request.worker, request.cost)
                try:
                    return ray.get(ref)
                except Exception as err:
                    if not is_worker_failure(err):
                        self.cancel()
                        raise
                    self._worker_down(request.worker, err, request.epoch)
                    if not request.resends.failed(request.worker, err):
                        self.cancel()
                        failures = request.resends.failures
                        raise WorkerUnavailableError(
                            f"prompt {request.index} failed {len(failures)} times as its workers "
                            f"died: {failures}; check `ray status` and the worker logs"
                        ) from err
                    self._send(request, avoid=frozenset([request.worker]))
            raise StopIteration

    def cancel(self) -> None:
        """Give up on the requests still in flight (best effort: the workers stop them)."""
        pending, self._pending = self._pending, {}
        for ref, request in pending.items():
            self._router.release(request.worker, request.cost)
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - already finished or its worker is gone
                pass

    def _send(self, request: _Request, avoid: frozenset[int] = frozenset()) -> None:
        try:
            worker = self._router.acquire(request.cost, worker=self._worker, avoid=avoid, timeout=self._remaining())
        except LookupError as err:
            if self._router.closed:
                raise ServiceClosedError(
                    f"prompt {request.index}: the rollout service was shut down while it ran; "
                    "create a new one (rollout.init) and resubmit"
                ) from err
            raise WorkerUnavailableError(f"prompt {request.index}: {err}; check `ray status`") from err
        handle = self._handles[worker]
        ref = handle.generate.remote(request.ids, self._sampling, request.index, self._return_logprobs)
        request.worker = worker
        request.epoch = self._router.epoch(worker)
        self._pending[ref] = request

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


class GenerationStream:
    """Completions of one `generate_async` call, in the order their prompts finish.

    The n samples of a prompt arrive together, one after the other; each Completion carries its
    `prompt_index`, `sample_index` and `weight_version`. Iterate with `for` (blocking) or
    `async for` (the wait runs in a thread, the event loop stays free); `groups()` /
    `agroups()` yield each prompt's list of n completions instead. `cancel()` (or leaving a
    `with` block early) stops the requests still running.
    """

    def __init__(self, dispatch: Dispatch):
        self._dispatch = dispatch

    def __len__(self) -> int:
        """Number of prompts (each yields n completions)."""
        return self._dispatch.num_prompts

    def groups(self) -> Iterator[list[Completion]]:
        while True:
            try:
                yield self._dispatch.next_group()
            except StopIteration:
                return

    def __iter__(self) -> Iterator[Completion]:
        for group in self.groups():
            yield from group

    async def agroups(self) -> AsyncIterator[list[Completion]]:
        while True:
            try:
                group = await asyncio.to_thread(self._next_or_none)
            except asyncio.CancelledError:
                self.cancel()
                raise
            if group is None:
                return
            yield group

    async def __aiter__(self) -> AsyncIterator[Completion]:
        async for group in self.agroups():
            for completion in group:
                yield completion

    def _next_or_none(self) -> list[Completion] | None:
        try:
            return self._dispatch.next_group()
        except StopIteration:  # StopIteration cannot cross into a coroutine
            return None

    def cancel(self) -> None:
        self._dispatch.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
