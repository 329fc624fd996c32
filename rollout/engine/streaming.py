"""Token streaming out of the engine: a per-request sink the scheduler feeds, read asynchronously.

The scheduler thread calls `TokenSink.update(sample)` each time it accepts a token of a streamed
request (and once when a sample finishes). The sink turns the sample's growing state into
`TokenDelta`s: new token ids, their logprobs and weight versions, and new text. Text that could
still be the start of a stop string is held back (up to the longest stop string minus one
character), so nothing streamed is ever taken back when the engine cuts the text before a stop.
The deltas of one sample concatenate to exactly its final Completion; when the request asks
for routed experts (SamplingParams.return_routed_experts), the sample's last delta carries its
`routed_experts` whole (Completion.routed_experts), known only once the sample finished. With
SamplingParams.top_logprobs, each delta carries the `top_logprobs` of its own tokens.

`stream_request(engine, ...)` is the asynchronous reader a worker uses: it submits the request
with a sink, yields the deltas gathered since the last wake-up (so a burst of decode steps is
one message, not one per token), ends when the request's future resolves and everything was
drained, and cancels the request at the engine's next step boundary if its consumer goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np

from rollout.engine.alternatives import TopLogprobs
from rollout.engine.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class TokenDelta:
    """What one sample gained since its previous delta. `finish_reason` is set on its last one,
    and so is `routed_experts` (the whole sample's, as Completion.routed_experts) when asked for."""

    sample_index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    token_versions: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    routed_experts: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    # the top-k alternatives of this delta's tokens (SamplingParams.top_logprobs), else None
    top_logprobs: TopLogprobs | None = dataclasses.field(default=None, compare=False, repr=False)


class TokenSink:
    """Thread-safe buffer of deltas: written by the scheduler thread, read on an event loop."""

    def __init__(self, sampling: SamplingParams, return_logprobs: bool, loop: asyncio.AbstractEventLoop):
        self._holdback = max((len(s) for s in sampling.stop), default=1) - 1
        self._return_logprobs = return_logprobs
        self._return_routes = sampling.return_routed_experts
        self._return_top = sampling.top_logprobs > 0
        self._loop = loop
        self._event = asyncio.Event()
        self._lock = threading.Lock()
        self._deltas: list[TokenDelta] = []
        self._sent_tokens = [0] * sampling.n
        self._sent_chars = [0] * sampling.n
        self._wake_scheduled = False

    def update(self, sample: Any) -> None:
        """Record what `sample` gained; called by the engine's scheduler thread.

        `sample` is the engine's rollout.engine.native.sequence.Sequence; read here: `index`, `tokens`,
        `logprobs`, `versions` (lists that only grow), `text.text` (only grows, except that a stop
        string cuts it, which sets `text.cut`) and `finish_reason` (None until it finished).
        """
        i = sample.index
        finished = sample.finish_reason is not None
        start = self._sent_tokens[i]
        text = sample.text.text
        visible = len(text) if finished or sample.text.cut else max(0, len(text) - self._holdback)
        new_text = text[self._sent_chars[i]:visible] if visible > self._sent_chars[i] else ""
        if start == len(sample.tokens) and not new_text and not finished:
            return
        delta = TokenDelta(
            sample_index=i,
            token_ids=tuple(sample.tokens[start:]),
            logprobs=tuple(sample.logprobs[start:]) if self._return_logprobs else None,
            token_versions=tuple(sample.versions[start:]),
            text=new_text,
            finish_reason=sample.finish_reason,
            # `routed_experts()` of the engine's Sequence: the sample's routes, once it finished
            routed_experts=sample.routed_experts() if finished and self._return_routes else None,
            # `top_logprobs(start)` of the engine's Sequence: the alternatives of the new tokens
            top_logprobs=sample.top_logprobs(start) if self._return_top else None,
        )
        self._sent_tokens[i] = len(sample.tokens)
        self._sent_chars[i] = max(self._sent_chars[i], visible)
        with self._lock:
            self._deltas.append(delta)
        self.wake()

    def wake(self) -> None:
        """Wake the reader (from any thread); wake-ups coalesce until the reader drains."""
        with self._lock:
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the reader's loop is closed: nobody is listening any more
            pass

    async def wait(self) -> None:
        await self._event.wait()

    def drain(self) -> list[TokenDelta]:
        """The deltas since the last drain, consecutive ones of a sample merged into one."""
        with self._lock:
            deltas, self._deltas = self._deltas, []
            self._wake_scheduled = False
            self._event.clear()
        return merge_deltas(deltas)


def merge_deltas(deltas: list[TokenDelta]) -> list[TokenDelta]:
    """One delta per sample (in order of first appearance), concatenating its parts."""
    merged: dict[int, TokenDelta] = {}
    for d in deltas:
        prev = merged.get(d.sample_index)
        if prev is None:
            merged[d.sample_index] = d
            continue
        merged[d.sample_index] = TokenDelta(
            sample_index=d.sample_index,
            token_ids=prev.token_ids + d.token_ids,
            logprobs=None if prev.logprobs is None or d.logprobs is None else prev.logprobs + d.logprobs,
            token_versions=prev.token_versions + d.token_versions,
            text=prev.text + d.text,
            finish_reason=d.finish_reason or prev.finish_reason,
            routed_experts=d.routed_experts if d.routed_experts is not None else prev.routed_experts,
            top_logprobs=concat_top(prev.top_logprobs, d.top_logprobs),
        )
    return list(merged.values())


def concat_top(first: TopLogprobs | None, second: TopLogprobs | None) -> TopLogprobs | None:
    """The alternatives of two consecutive runs of tokens (None when not asked for)."""
    if first is None or second is None:
        return first if second is None else second
    return TopLogprobs.concat([first, second])


async def stream_request(
    engine: Any,
    prompt_ids: list[int],
    sampling: SamplingParams,
    *,
    prompt_index: int = 0,
    return_logprobs: bool = True,
) -> AsyncGenerator[list[TokenDelta], None]:
    """Submit one prompt to `engine` and yield its deltas as they come (a list per wake-up).

    Ends after every sample's last delta; engine errors (e.g. EngineClosedError) are raised
    after the deltas that came before them. Closing or cancelling the iterator cancels the
    request at the engine's next step boundary.
    """
    sink = TokenSink(sampling, return_logprobs, asyncio.get_running_loop())
    future = engine.submit(prompt_ids, sampling, prompt_index=prompt_index, return_logprobs=return_logprobs, sink=sink)
    future.add_done_callback(lambda _: sink.wake())
    try:
        while True:
            await sink.wait()
            done = future.done()  # read before draining: every delta precedes the resolution
            deltas = sink.drain()
            if deltas:
                yield deltas
            if done:
                future.result()  # raises the engine's error, if any
                return
    finally:
        if not future.done():  # the consumer went away (cancelled, closed or failed)
            engine.cancel(future)
