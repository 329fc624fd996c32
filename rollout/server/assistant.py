"""The assistant message of a chat choice, from its generated text: reasoning, content, tool calls.

Reasoning (`<think>...</think>`, when the server runs with a reasoning parser) is split off
first; tool calls are parsed from what remains (when the request has tools and tool_choice is
not "none"). `AssistantParser` works on the whole text or incrementally, so a streamed choice
adds up to the non-streamed one.

    >>> p = AssistantParser(reasoning=True, tools=True, ids=iter(["call_0"]))
    >>> p.parse('<think>sunny?</think>\\n\\n<tool_call>{"name": "w", "arguments": {}}</tool_call>')
    AssistantDelta(reasoning='sunny?', content='', tool_calls=[ToolCall(id='call_0', name='w', arguments='{}')])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Self

from rollout.server.reasoning import ReasoningStream
from rollout.server.tool_calls import ToolCall, ToolCallStream


@dataclasses.dataclass
class AssistantDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def __iadd__(self, other: AssistantDelta) -> Self:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


class AssistantParser:
    """Splits one choice's text; `feed` pieces then `finish`, or `parse` a whole text (once)."""

    def __init__(self, *, reasoning: bool, tools: bool, in_reasoning: bool = False,
                 ids: Iterator[str] | None = None):
        self._reasoning = ReasoningStream(in_reasoning) if reasoning else None
        self._tools = ToolCallStream(ids) if tools else None
        self.called = False  # whether any tool call was parsed

    @property
    def saw_reasoning(self) -> bool:
        return self._reasoning is not None and self._reasoning.saw_reasoning

    def feed(self, text: str) -> AssistantDelta:
        return self._step(text, last=False)

    def finish(self) -> AssistantDelta:
        return self._step("", last=True)

    def parse(self, text: str) -> AssistantDelta:
        out = self.feed(text)
        out += self.finish()
        if out.tool_calls:
            out.content = out.content.strip()  # the newlines around the calls
        return out

    def _step(self, text: str, last: bool) -> AssistantDelta:
        out = AssistantDelta()
        content = text
        if self._reasoning is not None:
            out.reasoning, content = self._reasoning.feed(text)
            if last:
                more_r, more_c = self._reasoning.finish()
                out.reasoning += more_r
                content += more_c
        if self._tools is None:
            out.content = content
            return out
        out.content, out.tool_calls = self._tools.feed(content)
        if last:
            rest, _ = self._tools.finish()
            out.content += rest
        self.called = self.called or bool(out.tool_calls)
        return out
