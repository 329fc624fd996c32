"""Dispatch: the requests of one generate call, routed, re-sent when their worker dies, collected.

Each prompt (with its n samples) is one Ray call to one worker. A call that fails because its
worker died or restarted (or its engine crashed) is sent again to another live worker (or to
the same one once it is back, when pinned), within the request's re-send budget; its first
attempt produced nothing the caller sees, so every prompt is returned exactly once. Other errors
(a bug, a bad request that slipped past validation) propagate to the caller. The sending,
re-sending and collecting is rollout.coordinator.resend's (`Calls`), shared with streams and scoring.

`GenerationStream` yields completions as their prompts finish: a plain iterator for threads, an
async iterator for asyncio trainers (see `RolloutService.generate_async`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Self

from rollout.coordinator.fleet_view import FleetView
from rollout.coordinator.resend import Calls
from rollout.coordinator.routing import request_cost
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion


class Dispatch:
    """The prompts of one generate call in flight: one Ray call per prompt, sent and re-sent
    through rollout.coordinator.resend, collected as they finish (`next_group`)."""

    def __init__(
        self,
        fleet: FleetView,
        *,
        prompts: Sequence[list[int]],
        sampling: SamplingParams,
        return_logprobs: bool,
        worker: int | None,
        timeout: float | None,
    ):
        deadline = None if timeout is None else time.monotonic() + timeout
        self._calls: Calls[int] = Calls("generate", "prompts", deadline)
        self._lock = threading.Lock()
        self.num_prompts = len(prompts)
        try:
            for index, ids in enumerate(prompts):
                route = fleet.route(cost=request_cost(len(ids), sampling.max_tokens, sampling.n),
                                    name=f"prompt {index}", pinned=worker)
                self._calls.send(index, route, _generate_call(fleet.handles, ids, sampling, index, return_logprobs))
        except BaseException:
            self.cancel()
            raise

    @property
    def done(self) -> bool:
        return not self._calls

    def next_group(self) -> list[Completion]:
        """Block until some prompt finishes; its n completions. StopIteration when all are out."""
        with self._lock:
            try:
                done = self._calls.next()
            except BaseException:
                self.cancel()
                raise
            if done is None:  # every prompt is out (or the stream was cancelled)
                raise StopIteration
            return done[1]

    def cancel(self) -> None:
        """Give up on the requests still in flight (best effort: the workers stop them)."""
        self._calls.cancel()


def _generate_call(
    handles: Sequence[Any], ids: list[int], sampling: SamplingParams, index: int, return_logprobs: bool
) -> Any:
    return lambda worker: handles[worker].generate.remote(ids, sampling, index, return_logprobs)


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
