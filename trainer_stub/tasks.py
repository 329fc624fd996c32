"""The demo's toy task: teach a tiny random model to answer in digits.

The reward is verifiable (a rule, no judge model): the fraction of a completion's tokens that
are digits. A randomly initialized model writes a digit now and then, so every group of samples
has some spread in reward and the policy gradient has a signal from the first step; a 2-layer
model learns to put most of its mass on the ten digit tokens within a few dozen steps.

Digit tokens are found in the tokenizer's vocabulary (tokens whose text is one or more ASCII
digits), so the reward works for any tokenizer, not only the tiny test one.

    >>> task = DigitsTask(digit_ids=frozenset({10, 11}))
    >>> task.reward([10, 11, 5, 10])   # three of four tokens are digits
    0.75
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

DIGIT_PROMPTS: tuple[str, ...] = (
    "Write a number:",
    "Phone:",
    "The year is",
    "Pick a number between 1 and 100.",
    "Count to ten:",
    "My PIN is",
    "Answer with digits only.",
    "What is 12 * 7?",
)


@dataclasses.dataclass(frozen=True)
class DigitsTask:
    """Reward = fraction of generated tokens (a stop token included) that are digit tokens."""

    digit_ids: frozenset[int]
    prompts: tuple[str, ...] = DIGIT_PROMPTS

    @classmethod
    def for_tokenizer(cls, tokenizer, prompts: Sequence[str] = DIGIT_PROMPTS) -> DigitsTask:
        """`tokenizer`: a rollout.tokenizer.Tokenizer (or anything with vocab_size and decode)."""
        digit_ids = frozenset(
            i for i in range(tokenizer.vocab_size) if _is_digits(tokenizer.decode([i], skip_special_tokens=True))
        )
        if not digit_ids:
            raise ValueError(
                f"the tokenizer {tokenizer!r} has no digit tokens; the digits task needs a "
                "vocabulary with tokens for 0-9"
            )
        return cls(digit_ids=digit_ids, prompts=tuple(prompts))

    def reward(self, token_ids: Sequence[int]) -> float:
        """Fraction of `token_ids` that are digit tokens (0.0 for an empty completion)."""
        if not token_ids:
            return 0.0
        return sum(t in self.digit_ids for t in token_ids) / len(token_ids)


def _is_digits(text: str) -> bool:
    return bool(text) and all("0" <= c <= "9" for c in text)
