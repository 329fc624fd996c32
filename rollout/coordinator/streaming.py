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
again to another live worker (like `generate`; both send through rollout.coordinator.resend). Once deltas
were delivered, each unfinished sample is continued instead: its prompt plus the tokens already
delivered go to another worker as a new prompt, for the tokens still allowed. The driver detokenizes the continued samples
itself and checks their stop strings across the seam, so the caller gets exactly one copy of
every token and text that reads as if one worker had made it all. (A continued sample draws
its randomness afresh, and its later tokens may come from a newer weight version; each
token's version is in `token_versions`.)

Routed experts (SamplingParams.return_routed_experts, MoE models) come whole on each sample's
last delta and in its Completion. A continued sample gets the routes its continuation computed
(it re-fed the delivered tokens as its prompt: like a `recompute` swap, one forward's routes for
every position), cut to the sample's length; if the sample ended at a stop string across the
seam before its continuation finished, its routes are unknown and `routed_experts` is None.
Top-k alternatives (SamplingParams.top_logprobs) ride on every delta with its tokens, and are
cut at a seam's stop like them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Self

import numpy as np

from rollout.coordinator.fleet_view import FleetView
from rollout.coordinator.resend import DiedMidStream, call_resending, resending
from rollout.coordinator.routing import request_cost
from rollout.engine.alternatives import TopLogprobs
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.streaming import TokenDelta
from rollout.engine.types import Completion
from rollout.errors import WorkerUnavailableError, describe_error
from rollout.tokenizer import IncrementalDetokenizer


@dataclasses.dataclass
class _SampleState:
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    routed_experts: np.ndarray | None = None
    top_logprobs: list[TopLogprobs] = dataclasses.field(default_factory=list)  # per delta


class FleetRequest:
    """One prompt (with its n samples) on the fleet; its sends, re-sends and cancellation go
    through its `route` (rollout.coordinator.resend). `max_retries`: the fleet's unless given
    (a continued sample gets the re-sends its request has left)."""

    def __init__(
        self,
        fleet: FleetView,
        *,
        prompt_ids: list[int],
        sampling: SamplingParams,
        return_logprobs: bool,
        prompt_index: int = 0,
        tokenizer: Any = None,
        max_retries: int | None = None,
    ):
        self._fleet = fleet
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.return_logprobs = return_logprobs
        self.prompt_index = prompt_index
        self.tokenizer = tokenizer  # to continue samples whose worker died mid-stream
        self.route = fleet.route(cost=request_cost(len(prompt_ids), sampling.max_tokens, sampling.n),
                                 name="the request", max_retries=max_retries)

    def _args(self) -> tuple[Any, ...]:
        return self.prompt_ids, self.sampling, self.prompt_index, self.return_logprobs

    async def completions(self) -> list[Completion]:
        """The n completions, from one `generate` call on a worker (re-sent if it dies)."""
        return await call_resending(self.route, lambda worker: self._fleet.handles[worker].generate.remote(*self._args()))

    def deltas(self) -> AsyncGenerator[list[TokenDelta], None]:
        """The request's TokenDeltas from one `generate_stream` call on a worker (re-sent if it
        dies before the first; DiedMidStream if it dies after)."""
        return resending(
            self.route,
            lambda worker: self._fleet.handles[worker].generate_stream.options(num_returns="streaming").remote(*self._args()),
        )

    def continuation(self, token_ids: list[int]) -> FleetRequest:
        """One sample continued after `token_ids`: n=1, the tokens left, the retries left."""
        return FleetRequest(
            self._fleet,
            prompt_ids=self.prompt_ids + token_ids,
            sampling=dataclasses.replace(
                self.sampling, n=1, max_tokens=self.sampling.max_tokens - len(token_ids),
                # a constrained sample's delivered tokens are part of its constraint, not before it
                constraint_prefix=self.sampling.constraint_prefix + len(token_ids) if self.sampling.constraint else 0,
            ),
            return_logprobs=self.return_logprobs, prompt_index=self.prompt_index, tokenizer=self.tokenizer,
            max_retries=self.route.resends.retries_left,
        )


class TokenStream:
    """The deltas of one prompt's samples as the fleet generates them (`async for`).

    Each item is a list of TokenDelta (one per sample that progressed). After the iteration
    ended, `completions()` gives the n Completions the deltas add up to. `aclose()` (or leaving
    `async with`) cancels the request on its worker if it is still running. `worker` is the
    worker of its latest send (None before the first).
    """

    def __init__(self, request: FleetRequest):
        self._request = request
        self._samples = [_SampleState() for _ in range(request.sampling.n)]
        self._iter: AsyncGenerator[list[TokenDelta], None] | None = None

    @property
    def worker(self) -> int | None:
        return self._request.route.worker

    def __aiter__(self) -> AsyncIterator[list[TokenDelta]]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    async def aclose(self) -> None:
        if self._iter is not None:
            await self._iter.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[list[TokenDelta], None]:
        try:
            async with contextlib.aclosing(self._request.deltas()) as deltas:
                async for batch in deltas:
                    self._absorb(batch)
                    yield batch
            return
        except DiedMidStream as died:
            if self._request.tokenizer is None:
                raise WorkerUnavailableError(
                    f"worker {died.worker} died after part of this request was streamed; the partial output "
                    f"stands, send the request again for a complete one ({describe_error(died.cause)})"
                ) from died.cause
        async for batch in self._continue():
            yield batch

    async def _continue(self) -> AsyncIterator[list[TokenDelta]]:
        """Continue every unfinished sample on other workers (see the module docstring)."""
        request = self._request
        seams, streams = [], []
        for index, state in enumerate(self._samples):
            if state.finish_reason is None and len(state.token_ids) < request.sampling.max_tokens:
                seams.append(_Seam(index, state, request.tokenizer, request.sampling, len(request.prompt_ids)))
                streams.append(TokenStream(request.continuation(state.token_ids)))
        merged = StreamMerge(streams)
        try:
            async for i, deltas in merged:
                out = [d for d in (seams[i].feed(delta) for delta in deltas) if d is not None]
                if seams[i].done:
                    merged.stop(i)  # e.g. a stop string across the seam: its worker can stop
                if out:
                    self._absorb(out)
                    yield out
        finally:
            await merged.aclose()

    def _absorb(self, deltas: list[TokenDelta]) -> None:
        for d in deltas:
            s = self._samples[d.sample_index]
            s.token_ids += d.token_ids
            s.logprobs += d.logprobs or ()
            s.versions += d.token_versions
            s.text += d.text
            s.finish_reason = d.finish_reason or s.finish_reason
            if d.routed_experts is not None:
                s.routed_experts = d.routed_experts
            if d.top_logprobs is not None:
                s.top_logprobs.append(d.top_logprobs)

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
                routed_experts=s.routed_experts,
                top_logprobs=self._top(s),
            )
            for i, s in enumerate(self._samples)
        ]


    def _top(self, s: _SampleState) -> TopLogprobs | None:
        n = self._request.sampling.top_logprobs
        if not n:
            return None
        return TopLogprobs.concat(s.top_logprobs) if s.top_logprobs else TopLogprobs.empty(n)


class _Seam:
    """The text side of one sample continued on another worker.

    The continuing worker sees the delivered tokens as prompt, so its text starts at the seam
    and its stop strings cannot look across it. Here the sample's tokens are detokenized as
    one sequence and stop strings checked as the engine does (and text that may begin one held
    back), so the caller's text is what an uninterrupted sample would have had.
    """

    def __init__(self, index: int, state: _SampleState, tokenizer: Any, sampling: SamplingParams, prompt_len: int = 0):
        self.index = index
        self.prompt_len = prompt_len  # of the original request (to cut its routes to the sample)
        self.tokens = len(state.token_ids)  # the sample's tokens so far, delivered and continued
        self.stops = sampling.stop
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text = "".join(self.detok.push(t) for t in state.token_ids)
        self.sent = len(state.text)  # a prefix of self.text: the rest was held back
        self.done = False

    def feed(self, delta: TokenDelta) -> TokenDelta | None:
        """The caller's delta for what the continuation's worker sent (None once finished)."""
        if self.done:
            return None
        taken, reason, cut = len(delta.token_ids), delta.finish_reason, False
        for k, token in enumerate(delta.token_ids):
            piece = self.detok.push(token)
            self.text += piece
            if self.stops and self._cut_stop(len(piece)):
                taken, reason, cut = k + 1, "stop", True
                break
        self.tokens += taken
        routes = None
        if reason is not None:
            if not cut:
                self.text += self.detok.flush()
            self.done = True
            if delta.routed_experts is not None:  # the continuation's routes, past any stop cut
                routes = delta.routed_experts[: self.prompt_len + self.tokens - 1]
        visible = len(self.text) if self.done else max(0, len(self.text) - self.holdback)
        text = self.text[self.sent:visible] if visible > self.sent else ""
        self.sent = max(self.sent, visible)
        return TokenDelta(
            sample_index=self.index,
            token_ids=delta.token_ids[:taken],
            logprobs=None if delta.logprobs is None else delta.logprobs[:taken],
            token_versions=delta.token_versions[:taken],
            text=text,
            finish_reason=reason,
            routed_experts=routes,
            top_logprobs=None if delta.top_logprobs is None else delta.top_logprobs[:taken],
        )

    def _cut_stop(self, new_chars: int) -> bool:
        longest = max(len(s) for s in self.stops)
        start = max(0, len(self.text) - new_chars - longest + 1)
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True


class StreamMerge:
    """(index, deltas) from several TokenStreams as they come (`async for`); `stop(i)` stops
    stream i (its request is cancelled on its worker); `aclose()` stops all of them."""

    def __init__(self, streams: Sequence[TokenStream]):
        self._streams = list(streams)
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._active = set(range(len(self._streams)))
        self._tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(self._streams)]

    async def _pump(self, i: int, stream: TokenStream) -> None:
        try:
            async for deltas in stream:
                await self._queue.put((i, deltas))
        except Exception as err:  # noqa: BLE001 - handed to the reader
            await self._queue.put((i, err))
            return
        await self._queue.put((i, None))

    async def __aiter__(self) -> AsyncIterator[tuple[int, list[TokenDelta]]]:
        while self._active:
            i, item = await self._queue.get()
            if i not in self._active:
                continue  # stopped meanwhile
            if item is None:
                self._active.discard(i)
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item

    def stop(self, i: int) -> None:
        self._active.discard(i)
        self._tasks[i].cancel()

    async def aclose(self) -> None:
        self._active.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in self._streams:
            await stream.aclose()
