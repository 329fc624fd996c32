"""Reasoning in generated text, Qwen3 style: `<think>...</think>` before the answer.

Pure functions over text. Qwen3 writes `<think>\\n...\\n</think>\\n\\n` and then its answer; newer
chat templates open the block in the prompt (it ends with `<think>\\n`), so the model writes only
the closing tag. Hence `starts_in_reasoning(prompt_text)`: the parser starts inside the block
when the prompt left one open, and otherwise only when the text begins with `<think>`. Text
with no block is all content; a block never closed (cut by max_tokens) is all reasoning.

    >>> parse_reasoning("<think>\\nLet me see.\\n</think>\\n\\nIt is 4.")
    ('Let me see.', 'It is 4.')
    >>> parse_reasoning("Let me see.</think>It is 4.", in_reasoning=True)
    ('Let me see.', 'It is 4.')
    >>> parse_reasoning("It is 4.")
    (None, 'It is 4.')

`ReasoningStream` does the same for streamed text cut anywhere (tags split across chunks).
"""

from __future__ import annotations

from rollout.server.tool_calls import partial_suffix

START = "<think>"
END = "</think>"


def starts_in_reasoning(prompt_text: str) -> bool:
    """Whether the prompt opened a think block it did not close (the model continues inside it).

    >>> starts_in_reasoning("<|im_start|>assistant\\n<think>\\n"), starts_in_reasoning("...<think>\\n\\n</think>\\n\\n")
    (True, False)
    """
    return prompt_text.rfind(START) > prompt_text.rfind(END)


def parse_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole generated text."""
    stream = ReasoningStream(in_reasoning)
    reasoning, content = stream.feed(text)
    more_r, more_c = stream.finish()
    reasoning, content = reasoning + more_r, content + more_c
    return (reasoning.strip("\n") if stream.saw_reasoning else None), content


class ReasoningStream:
    """Incremental `parse_reasoning`: `feed(text)` and then `finish()`, each -> (reasoning, content).

    >>> s = ReasoningStream()
    >>> [s.feed(p) for p in ["<thi", "nk>\\nhm", "m</th", "ink>\\n\\nYes"]]
    [('', ''), ('hm', ''), ('m', ''), ('', 'Yes')]
    >>> s.finish()
    ('', '')
    """

    def __init__(self, in_reasoning: bool = False):
        # "start": before any text (a leading <think> may come); "think": inside; "content": after
        self._state = "think" if in_reasoning else "start"
        self.saw_reasoning = in_reasoning
        self._held = ""
        self._lead = in_reasoning  # newlines right after <think> are dropped
        self._after_end = False  # newlines right after </think> are dropped

    def feed(self, text: str) -> tuple[str, str]:
        buf = self._held + text
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while buf:
            if self._state == "start":
                stripped = buf.lstrip()
                if START.startswith(stripped) and len(stripped) < len(START):
                    self._held = buf  # may still become <think>
                    break
                if stripped.startswith(START):
                    self._state, self.saw_reasoning, self._lead = "think", True, True
                    buf = stripped[len(START):]
                else:
                    self._state = "content"
            elif self._state == "think":
                if self._lead:
                    buf = buf.lstrip("\n")
                    if not buf:
                        break
                    self._lead = False
                at = buf.find(END)
                if at < 0:
                    keep = partial_suffix(buf, END)
                    head = buf[: len(buf) - keep]
                    keep += len(head) - len(head.rstrip("\n"))  # newlines before </think> are dropped
                    reasoning.append(buf[: len(buf) - keep])
                    self._held = buf[len(buf) - keep:]
                    break
                reasoning.append(buf[:at].rstrip("\n"))
                self._state, self._after_end, buf = "content", True, buf[at + len(END):]
            else:
                if self._after_end:
                    buf = buf.lstrip("\n")
                    if not buf:
                        break
                    self._after_end = False
                content.append(buf)
                break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._state == "think":
            return held.rstrip("\n"), ""
        return "", held
