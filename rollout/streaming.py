"""Fleet-level asynchronous generation of one prompt: token streams and awaitable completions.

    async with svc.generate_stream(prompt, SamplingParams(n=2, max_tokens=64)) as stream:
        async for deltas in stream:          # lists of rollout.engine.streaming.TokenDelta
            ...
    stream.completions()                     # the n Completions, assembled from the deltas

    outs = await svc.agenerate(prompt, sampling)   # the n Completions, one Ray call

Both run on the caller's event loop (Ray object refs are awaited, no thread per request), route
the prompt to the least-loaded live worker, and cancel the request on its worker at the next
engine step when the caller stops early (closes the stream or cancels the task).

Worker death: a request whose worker dies before anything of it reached the caller is sent
again to another live worker (like `generate`), so nothing is lost or repeated. Once deltas
were delivered, sending it again would repeat or contradict them, so the stream raises
WorkerUnavailableError instead; what was delivered stands.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import ray

from rollout.dispatch import is_worker_failure
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.streaming import TokenDelta
from rollout.engine.types import Completion
from rollout.errors import ServiceClosedError, WorkerUnavailableError
from rollout.routing import Router, request_cost
from rollout.sync import describe_error

_MAX_UNAVAILABLE = 100  # re-sends to restarting workers (each waits for a worker to be up)


@dataclasses.dataclass
class _SampleState:
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class FleetRequest:
    """One prompt (with its n samples) on the fleet: routing, re-sends and cancellation."""

    def __init__(
        self,
        *,
        handles: Sequence[Any],
        router: Router,
        worker_down: Callable[[int, BaseException, int | None], None],
        prompt_ids: list[int],
        sampling: SamplingParams,
        return_logprobs: bool,
        max_retries: int,
        prompt_index: int = 0,
    ):
        self._handles = handles
        self._router = router
        self._worker_down = worker_down
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.return_logprobs = return_logprobs
        self.prompt_index = prompt_index
        self._max_retries = max_retries
        self._cost = request_cost(len(prompt_ids), sampling.max_tokens, sampling.n)
        self._failures: list[str] = []
        self._attempts = 0
        self._unavailable = 0

    async def _acquire(self, avoid: frozenset[int]) -> int:
        try:
            try:
                return self._router.acquire(self._cost, avoid=avoid, timeout=0)
            except TimeoutError:  # no worker up right now: wait off the event loop
                return await asyncio.to_thread(self._router.acquire, self._cost, avoid=avoid, timeout=None)
        except LookupError as err:
            if self._router.closed:
                raise ServiceClosedError(
                    "the rollout service was shut down; create a new one (rollout.init) and resubmit"
                ) from err
            raise WorkerUnavailableError(f"{err}; check `ray status`") from err

    def _failed(self, worker: int, epoch: int, err: BaseException) -> None:
        """Record a worker failure; raise if the request has used up its re-sends."""
        self._worker_down(worker, err, epoch)
        self._failures.append(f"worker {worker}: {describe_error(err)}")
        if isinstance(err, ray.exceptions.ActorUnavailableError):
            self._unavailable += 1
        else:
            self._attempts += 1
        if self._attempts > self._max_retries or self._unavailable > _MAX_UNAVAILABLE:
            raise WorkerUnavailableError(
                f"the request failed {len(self._failures)} times as its workers died: {self._failures}; "
                "check `ray status` and the worker logs"
            ) from err

    async def completions(self) -> list[Completion]:
        """The n completions, from one `generate` call on a worker (re-sent if it dies)."""
        avoid: frozenset[int] = frozenset()
        while True:
            worker = await self._acquire(avoid)
            epoch = self._router.epoch(worker)
            ref = self._handles[worker].generate.remote(
                self.prompt_ids, self.sampling, self.prompt_index, self.return_logprobs
            )
            try:
                return await ref
            except asyncio.CancelledError:
                ray.cancel(ref)  # the worker cancels the engine request
                raise
            except Exception as err:
                if not is_worker_failure(err):
                    raise
                self._failed(worker, epoch, err)
                avoid = frozenset([worker])
            finally:
                self._router.release(worker, self._cost)


class TokenStream:
    """The deltas of one prompt's samples as the fleet generates them (`async for`).

    Each item is a list of TokenDelta (one per sample that progressed). After the iteration
    ended, `completions()` gives the n Completions the deltas add up to. `aclose()` (or leaving
    `async with`) cancels the request on its worker if it is still running.
    """

    def __init__(self, request: FleetRequest):
        self._request = request
        self._samples = [_SampleState() for _ in range(request.sampling.n)]
        self._delivered = False
        self._iter: AsyncIterator[list[TokenDelta]] | None = None
        self.worker: int | None = None

    def __aiter__(self) -> AsyncIterator[list[TokenDelta]]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    async def aclose(self) -> None:
        if self._iter is not None:
            await self._iter.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> AsyncIterator[list[TokenDelta]]:
        request = self._request
        avoid: frozenset[int] = frozenset()
        while True:
            worker = await request._acquire(avoid)
            self.worker = worker
            epoch = request._router.epoch(worker)
            gen = request._handles[worker].generate_stream.options(num_returns="streaming").remote(
                request.prompt_ids, request.sampling, request.prompt_index, request.return_logprobs
            )
            finished = False
            try:
                async for ref in gen:
                    deltas = await ref
                    self._absorb(deltas)
                    self._delivered = True
                    yield deltas
                finished = True
                return
            except Exception as err:
                if not is_worker_failure(err):
                    finished = True
                    raise
                if self._delivered:
                    request._worker_down(worker, err, epoch)
                    finished = True
                    raise WorkerUnavailableError(
                        f"worker {worker} died after part of this request was streamed "
                        f"({sum(len(s.token_ids) for s in self._samples)} tokens); the partial output stands, "
                        f"send the request again for a complete one ({describe_error(err)})"
                    ) from err
                request._failed(worker, epoch, err)
                avoid = frozenset([worker])
            finally:
                request._router.release(worker, request._cost)
                if not finished:  # the caller stopped early: stop the request on its worker
                    try:
                        ray.cancel(gen)
                    except Exception:  # noqa: BLE001 - already finished or its worker is gone
                        pass

    def _absorb(self, deltas: list[TokenDelta]) -> None:
        for d in deltas:
            s = self._samples[d.sample_index]
            s.token_ids += d.token_ids
            s.logprobs += d.logprobs or ()
            s.versions += d.token_versions
            s.text += d.text
            s.finish_reason = d.finish_reason or s.finish_reason

    def completions(self) -> list[Completion]:
        """The n Completions made of the deltas streamed so far (finish_reason "abort" for a
        sample that did not finish)."""
        request = self._request
        return [
            Completion(
                prompt_index=request.prompt_index,
                sample_index=i,
                prompt_token_ids=tuple(request.prompt_ids),
                token_ids=tuple(s.token_ids),
                text=s.text,
                logprobs=tuple(s.logprobs) if request.return_logprobs else None,
                finish_reason=s.finish_reason or "abort",
                weight_version=s.versions[-1] if s.versions else -1,
                token_versions=tuple(s.versions),
            )
            for i, s in enumerate(self._samples)
        ]
