"""Tests of rollout.tokenizer against transformers' tokenizer on a tiny generated checkpoint."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from rollout.testing import make_tiny_checkpoint
from rollout.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world! How are you today?",
    "What is 123 + 456? The answer is 579.",
    "你是谁？我是一个助手。",
    "emoji 😀🚀 and café naïve",
    "  leading spaces,\ttabs\n\nand newlines\r\n",
    "e\u0301 (combining accent) and ｆｕｌｌｗｉｄｔｈ",
    "<|im_start|>user\nhi<|im_end|>\n",
]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你是谁? What is 2 + 2?"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint: pathlib.Path) -> Tokenizer:
    return Tokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint: pathlib.Path):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


@pytest.mark.parametrize("text", ["你是谁", "我是一个助手", "emoji 😀🚀👍🏽", *TEXTS])
def test_encode_decode_round_trips_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers_ids(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text, add_special_tokens=True) == hf_tokenizer.encode(text, add_special_tokens=True)


def test_decode_equals_transformers_decode_for_random_ids(tokenizer: Tokenizer, hf_tokenizer) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, tokenizer.vocab_size, size=40).tolist()
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
                ids, skip_special_tokens=skip
            )


def test_vocab_size_counts_added_tokens_like_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    assert tokenizer.vocab_size == len(hf_tokenizer) == len(tokenizer)


def test_eos_token_ids_contain_im_end_then_endoftext(tokenizer: Tokenizer) -> None:
    im_end, endoftext = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    assert tokenizer.eos_token_ids == (im_end, endoftext)


def test_pad_token_id_is_endoftext(tokenizer: Tokenizer, hf_tokenizer) -> None:
    assert tokenizer.pad_token_id == tokenizer.token_to_id("<|endoftext|>") == hf_tokenizer.pad_token_id


def test_token_to_id_of_unknown_token_is_none(tokenizer: Tokenizer) -> None:
    assert tokenizer.token_to_id("<|not-a-token|>") is None


def test_generation_config_eos_may_be_a_single_int(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    copy = pathlib.Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    endoftext = Tokenizer.from_pretrained(copy).token_to_id("<|endoftext|>")
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": endoftext}))
    tok = Tokenizer.from_pretrained(copy)
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"), endoftext)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(tokenizer: Tokenizer, hf_tokenizer, add_generation_prompt: bool) -> None:
    ours = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_ids_equal_transformers(tokenizer: Tokenizer, hf_tokenizer, add_generation_prompt: bool) -> None:
    ours = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True)
    theirs = hf_tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ours == list(theirs)


def test_chat_template_passes_extra_kwargs_like_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    ours = tokenizer.apply_chat_template(CONVERSATION, enable_thinking=False)
    theirs = hf_tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_raise_exception_becomes_chat_template_error(tokenizer: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="Unknown role robot"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_missing_chat_template_raises_clear_error(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    copy = pathlib.Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        Tokenizer.from_pretrained(copy).apply_chat_template(CONVERSATION)


def test_missing_tokenizer_json_raises_naming_the_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)


def _pushed(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


def test_incremental_detokenizer_equals_decode_for_random_ids(tokenizer: Tokenizer) -> None:
    rng = np.random.default_rng(0)
    for length in [1, 2, 5, 17, 64, 200]:
        for _ in range(10):
            ids = rng.integers(0, tokenizer.vocab_size, size=length).tolist()
            pieces, tail = _pushed(tokenizer, ids)
            assert "".join(pieces) + tail == tokenizer.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_emits_whole_characters_of_multibyte_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    pieces, tail = _pushed(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert tail == ""
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_detokenizer_holds_back_a_split_character(tokenizer: Tokenizer) -> None:
    # 😀 is 4 UTF-8 bytes; the tiny tokenizer never merged them, so it spans several tokens.
    ids = tokenizer.encode("😀")
    assert len(ids) > 1
    detok = tokenizer.incremental_detokenizer()
    assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    assert detok.text == "😀"


def test_incremental_detokenizer_text_includes_the_held_back_tail(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 😀")
    detok = tokenizer.incremental_detokenizer()
    for i in ids[:-1]:
        detok.push(i)
    assert detok.text == tokenizer.decode(ids[:-1])
    assert detok.text.endswith("\ufffd")


def test_incremental_detokenizer_skips_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\nhello<|im_end|>")
    pieces, tail = _pushed(tokenizer, ids)
    assert "".join(pieces) + tail == "assistant\nhello"


def test_incremental_detokenizer_pushes_without_decoding_the_whole_sequence(tokenizer: Tokenizer, monkeypatch) -> None:
    """Each push decodes a short window in tokenizers' DecodeStream; a whole-sequence decode
    happens only at flush, and only for a held-back tail."""
    lengths: list[int] = []
    real_decode = tokenizer.decode

    def counting_decode(ids, skip_special_tokens=True):
        ids = list(ids)
        lengths.append(len(ids))
        return real_decode(ids, skip_special_tokens)

    detok = IncrementalDetokenizer(tokenizer)
    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    ids = tokenizer.encode("你是谁？我是一个助手。 The answer is 579. 😀 " * 20)
    pieces = [detok.push(i) for i in ids]
    assert len(ids) > 300
    assert lengths == []
    assert detok.flush() == "" and lengths == []
    assert "".join(pieces) == real_decode(ids)


@pytest.mark.parametrize("text", [*TEXTS, "你是谁？我是一个助手。😀🚀👍🏽 naïve"])
def test_incremental_text_after_every_token_is_transformers_decode_of_the_tokens_so_far(
    tokenizer: Tokenizer, hf_tokenizer, text: str
) -> None:
    ids = tokenizer.encode(text)
    detok = tokenizer.incremental_detokenizer()
    emitted = ""
    for n, token in enumerate(ids, 1):
        emitted += detok.push(token)
        theirs = hf_tokenizer.decode(ids[:n], skip_special_tokens=True)
        if theirs.endswith("\ufffd"):  # a character still incomplete: held back
            assert theirs.startswith(emitted) and len(emitted) < len(theirs)
        else:
            assert emitted == theirs
    assert emitted + detok.flush() == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_detokenizer_equals_transformers_decode_for_random_ids(tokenizer: Tokenizer, hf_tokenizer) -> None:
    rng = np.random.default_rng(1)
    for length in [1, 3, 17, 64]:
        for _ in range(10):
            ids = rng.integers(0, tokenizer.vocab_size, size=length).tolist()
            pieces, tail = _pushed(tokenizer, ids)
            assert "".join(pieces) + tail == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_push_after_flush_raises(tokenizer: Tokenizer) -> None:
    detok = tokenizer.incremental_detokenizer()
    detok.push(tokenizer.encode("a")[0])
    detok.flush()
    with pytest.raises(RuntimeError, match="after flush"):
        detok.push(tokenizer.encode("b")[0])
