"""Server-sent events: the response class and the merge of several prompts' token streams.

`SSEResponse` watches the connection while it streams: when the client goes away, the body's
generator is cancelled at once (at its current await, typically the next engine step's tokens)
instead of when the next chunk fails to send, and closed, so the request stops on its worker.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rollout.coordinator.streaming import StreamMerge, TokenStream
from rollout.engine.streaming import TokenDelta

DONE = "data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away while we wrote
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()  # disconnected: cancel the body where it waits
        close = getattr(self.body_iterator, "aclose", None)
        if close is not None:
            await close()


async def merge_streams(streams: Sequence[TokenStream]) -> AsyncIterator[tuple[int, list[TokenDelta]]]:
    """(stream index, deltas) from several TokenStreams, as they come. Closing this closes all."""
    if len(streams) == 1:  # the common case: no tasks, no queue
        async for deltas in streams[0]:
            yield 0, deltas
        return
    merged = StreamMerge(streams)
    try:
        async for item in merged:
            yield item
    finally:
        await merged.aclose()
