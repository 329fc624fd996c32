"""Tool calls in generated text, Qwen3 / Hermes style: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Pure functions over text (no tokenizer, no HTTP). A block whose JSON does not parse, or that has
no string "name", is not a call: its text stays in the content, verbatim (a malformed call is the
model's output, never a server error). A block left open at the end of the text (cut by
max_tokens) is content too.

    >>> content, calls = parse_tool_calls('Let me look.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>',
    ...                                   ids=iter(["call_0"]))
    >>> content, calls
    ('Let me look.', [ToolCall(id='call_0', name='f', arguments='{"x": 1}')])
    >>> parse_tool_calls('<tool_call>{oops}</tool_call>')
    ('<tool_call>{oops}</tool_call>', [])

`ToolCallStream` does the same incrementally, for streamed text cut anywhere (a tag may be
split across chunks): content is passed on as it comes, except a tail that could be the start
of `<tool_call>`; a call is emitted whole (id, name and all its arguments in one delta) when its
closing tag arrives. Streamed content keeps the whitespace around calls that the whole-text
parse strips.

    >>> s = ToolCallStream(ids=iter(["call_0"]))
    >>> [s.feed(piece) for piece in ["Hi <tool", "_call>{\\"name\\": \\"f\\"", "}</tool_", "call> bye <to"]]
    [('Hi ', []), ('', []), ('', []), (' bye ', [ToolCall(id='call_0', name='f', arguments='{}')])]
    >>> s.finish()   # a tail that might have become a tag is content after all
    ('<to', [])
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

START = "<tool_call>"
END = "</tool_call>"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call: OpenAI's `{"id", "type": "function", "function": {"name", "arguments"}}`."""

    id: str
    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI sends it

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_ids() -> Iterator[str]:
    """Fresh OpenAI-style call ids: `call_` + 24 hex digits."""
    while True:
        yield "call_" + uuid.uuid4().hex[:24]


def parse_call(body: str, call_id: str) -> ToolCall | None:
    """The call in the text between the tags, or None if it is not one.

    >>> parse_call(' {"name": "f", "arguments": {"a": "é"}} ', "c")
    ToolCall(id='c', name='f', arguments='{"a": "é"}')
    >>> parse_call('{"name": "f", "arguments": "{\\\\"a\\\\": 1}"}', "c").arguments   # already a JSON string
    '{"a": 1}'
    >>> parse_call('{"arguments": {}}', "c") is None   # no name
    True
    """
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(call_id, obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, ids: Iterator[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole generated text. The content is the text outside well-formed
    call blocks, stripped of surrounding whitespace when there are calls (the newlines the
    model writes around its calls)."""
    stream = ToolCallStream(ids)
    content, calls = stream.feed(text)
    rest, more = stream.finish()
    content += rest
    calls += more
    return (content.strip() if calls else content), calls


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (it may continue as the tag).

    >>> partial_suffix("abc <tool", START), partial_suffix("abc <x", START), partial_suffix("a<", START)
    (5, 0, 1)
    """
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallStream:
    """Incremental `parse_tool_calls`: `feed(text)` and then `finish()`, each -> (content, calls)."""

    def __init__(self, ids: Iterator[str] | None = None):
        self._ids = ids if ids is not None else new_call_ids()
        self._held = ""  # content that may be the start of START, not yet passed on
        self._body: str | None = None  # inside a call: the text after START so far

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        buf = self._held + text
        self._held = ""
        while buf:
            if self._body is None:
                at = buf.find(START)
                if at < 0:
                    keep = partial_suffix(buf, START)
                    content.append(buf[: len(buf) - keep])
                    self._held = buf[len(buf) - keep:]
                    break
                content.append(buf[:at])
                self._body, buf = "", buf[at + len(START):]
            else:
                body = self._body + buf
                end = body.find(END)
                if end < 0:
                    self._body = body
                    break
                call = parse_call(body[:end], next(self._ids))
                if call is None:  # not a call: its text is content, tags and all
                    content.append(START + body[: end + len(END)])
                else:
                    calls.append(call)
                self._body, buf = None, body[end + len(END):]
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is still held at the end of the text: a partial tag, or an unclosed block, as content."""
        rest = self._held + ("" if self._body is None else START + self._body)
        self._held, self._body = "", None
        return rest, []
