"""A sequence's text as its tokens arrive: stop strings cut it, otherwise it is the full decode."""

from __future__ import annotations

import pytest

from rollout.engine.native.text import TextOutput
from rollout.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_qwen3)


def _push_until_stop(output: TextOutput, ids: list[int]) -> int | None:
    """Index of the token at which a stop string appeared, or None."""
    for i, token in enumerate(ids):
        if output.push(token):
            return i
    return None


def test_a_multibyte_stop_string_split_across_tokens_cuts_the_text_before_it(tokenizer):
    ids = tokenizer.encode("你是谁？我是一个助手。😀 later text")
    output = TextOutput(tokenizer.incremental_detokenizer(), stop=("助手", "😀"))
    at = _push_until_stop(output, ids)
    assert at is not None
    assert tokenizer.decode(ids[: at + 1]).endswith("助手")  # the token that completed it
    assert output.text == "你是谁？我是一个"
    output.finish()
    assert output.text == "你是谁？我是一个"


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer.encode("a, b; c")
    output = TextOutput(tokenizer.incremental_detokenizer(), stop=("; c", ","))
    assert _push_until_stop(output, ids) is not None
    assert output.text == "a"


def test_without_a_stop_string_the_text_is_the_full_decode_including_a_held_back_tail(tokenizer):
    ids = tokenizer.encode("ok 😀")[:-1]  # ends inside the emoji's bytes
    output = TextOutput(tokenizer.incremental_detokenizer(), stop=("never",))
    assert _push_until_stop(output, ids) is None
    output.finish()
    assert output.text == tokenizer.decode(ids) and output.text.endswith("\ufffd")
