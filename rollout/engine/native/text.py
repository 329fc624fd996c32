"""A sequence's text as its tokens arrive: incremental detokenization and stop strings.

`TextOutput.push(token)` appends the text the token completes and reports whether a stop string
appeared; the text is then cut before the earliest stop string and final. `finish()` appends a
held-back tail (an incomplete UTF-8 character at the end) unless the text was cut. So an
uncut text equals `tokenizer.decode(tokens)`.
"""

from __future__ import annotations

from rollout.tokenizer import IncrementalDetokenizer


class TextOutput:
    def __init__(self, detokenizer: IncrementalDetokenizer, stop: tuple[str, ...] = ()):
        self._detok = detokenizer
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self.text = ""
        self.cut = False  # cut at a stop string: later pieces are not text

    def push(self, token: int) -> bool:
        """Append `token`'s text. True if a stop string appeared (the text is now cut before it)."""
        piece = self._detok.push(token)
        self.text += piece
        return bool(self._stop) and self._cut_at_stop(len(piece))

    def finish(self) -> None:
        """The sequence ended without a stop string: append what the detokenizer held back."""
        if not self.cut:
            self.text += self._detok.flush()

    def _cut_at_stop(self, new_chars: int) -> bool:
        # Only a window reaching back one stop length before the new piece can hold a new match.
        start = max(0, len(self.text) - new_chars - self._longest_stop + 1)
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.cut = True
        return True
