"""The server's pure parts without Ray: bind rule, api key, request -> SamplingParams, chat prompts."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from rollout.engine.config import EngineConfig
from rollout.models.config import ModelConfig
from rollout.prompts import PromptValidator
from rollout.server import translate
from rollout.server.auth import check_bind, check_key, is_loopback
from rollout.server.errors import APIError
from rollout.server.schema import ChatCompletionRequest, CompletionRequest
from rollout.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def validator(tiny_qwen3):
    return PromptValidator(ModelConfig.from_pretrained(tiny_qwen3), Tokenizer.from_pretrained(tiny_qwen3),
                           EngineConfig(max_batch=4, max_seq_len=64))


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("10.0.0.3", False),
                                            ("::", False), ("myhost.example", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_bind_needs_a_key():
    with pytest.raises(ValueError, match=r"refusing to bind '0\.0\.0\.0' without an api key.*--api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "key")
    check_bind("127.0.0.1", None)


@pytest.mark.parametrize("header", [None, "", "Bearer nope", "Basic sekrit", "sekrit"])
def test_wrong_or_missing_key_is_401(header):
    with pytest.raises(APIError) as info:
        check_key(header, "sekrit")
    assert info.value.status == 401


def test_right_key_or_no_key_passes():
    check_key("Bearer sekrit", "sekrit")
    check_key("bearer sekrit", "sekrit")
    check_key(None, None)


def test_request_fields_map_to_sampling_params():
    req = CompletionRequest(model="m", prompt="x", max_tokens=7, temperature=0.5, top_p=0.9, n=2, seed=3,
                            stop="\n", top_k=-1, stop_token_ids=[4], ignore_eos=True)
    sp = translate.sampling_params(req, req.max_tokens, [3], 64)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.n, sp.seed) == (7, 0.5, 0.9, 0, 2, 3)
    assert sp.stop == ("\n",) and sp.stop_token_ids == (4,) and sp.ignore_eos


def test_chat_without_max_tokens_may_use_the_rest_of_the_context():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert translate.sampling_params(req, None, [10], 64).max_tokens == 54
    with pytest.raises(APIError, match="fills the context"):
        translate.sampling_params(req, None, [64], 64)


def test_out_of_range_value_names_its_field():
    req = CompletionRequest(model="m", prompt="x", temperature=-2)
    with pytest.raises(APIError) as info:
        translate.sampling_params(req, 4, [1], 64)
    assert info.value.status == 400 and info.value.param == "temperature"


def test_chat_content_parts_are_joined_and_images_refused(validator):
    parts = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    plain = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hello there"}])
    assert translate.chat_prompt(parts, validator) == translate.chat_prompt(plain, validator)
    image = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}])
    with pytest.raises(APIError, match="image_url"):
        translate.chat_prompt(image, validator)


def test_enable_thinking_reaches_the_template(validator):
    messages = [{"role": "user", "content": "hi"}]
    off = ChatCompletionRequest(model="m", messages=messages, enable_thinking=False)
    ids = translate.chat_prompt(off, validator)
    assert ids == validator.tokenizer.apply_chat_template(messages, enable_thinking=False, tokenize=True)
    assert "<think>" in validator.tokenizer.decode(ids, skip_special_tokens=False)


def test_completion_prompt_forms(validator):
    one = translate.completion_prompts(CompletionRequest(model="m", prompt=[1, 2, 3]), validator)
    many = translate.completion_prompts(CompletionRequest(model="m", prompt=[[1, 2], [3]]), validator)
    texts = translate.completion_prompts(CompletionRequest(model="m", prompt=["a", "b"]), validator)
    assert one == [[1, 2, 3]] and many == [[1, 2], [3]] and len(texts) == 2


def test_a_continued_sample_finds_a_stop_string_across_the_seam(validator):
    from rollout.coordinator.streaming import _SampleState, _Seam
    from rollout.engine.sampling_params import SamplingParams
    from rollout.engine.streaming import TokenDelta

    tokenizer = validator.tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text)
    stop = "fox jumps"
    seam = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("fox"))
    delivered = tokenizer.decode(ids[:seam])
    sent = delivered[: len(delivered) - (len(stop) - 1)]  # what the engine streamed: the rest held back
    state = _SampleState(token_ids=ids[:seam], text=sent, finish_reason=None)
    cont = _Seam(0, state, tokenizer, SamplingParams(stop=(stop,)))
    rest = ids[seam:]
    out = cont.feed(TokenDelta(0, tuple(rest), None, tuple([1] * len(rest)), "ignored: the worker's text"))
    assert sent + out.text == text[: text.find(stop)] and out.finish_reason == "stop" and cont.done
    finished = len(tokenizer.decode(ids[: seam + len(out.token_ids)])) >= text.find(stop) + len(stop)
    assert finished and len(out.token_ids) < len(rest)  # tokens after the stop are dropped
    assert cont.feed(TokenDelta(0, (5,), None, (1,), "x")) is None


def test_a_continued_sample_keeps_the_top_logprobs_of_the_tokens_it_keeps(validator):
    import numpy as np

    from rollout.coordinator.streaming import _SampleState, _Seam
    from rollout.engine.alternatives import TopLogprobs
    from rollout.engine.sampling_params import SamplingParams
    from rollout.engine.streaming import TokenDelta

    tokenizer = validator.tokenizer
    ids = tokenizer.encode("one two three four five six")
    stop = "three"
    seam = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("two"))
    state = _SampleState(token_ids=ids[:seam], text="")
    cont = _Seam(0, state, tokenizer, SamplingParams(stop=(stop,), top_logprobs=2))
    rest = ids[seam:]
    top = TopLogprobs(np.arange(2 * len(rest), dtype=np.int32).reshape(-1, 2),
                      -np.arange(2 * len(rest), dtype=np.float32).reshape(-1, 2))
    out = cont.feed(TokenDelta(0, tuple(rest), None, (1,) * len(rest), "", top_logprobs=top))
    assert out is not None and out.finish_reason == "stop" and len(out.token_ids) < len(rest)
    assert out.top_logprobs is not None
    np.testing.assert_array_equal(out.top_logprobs.token_ids, top.token_ids[: len(out.token_ids)])


def test_a_continued_sample_keeps_its_continuations_routes_cut_to_its_length(validator):
    import numpy as np

    from rollout.coordinator.streaming import _SampleState, _Seam
    from rollout.engine.sampling_params import SamplingParams
    from rollout.engine.streaming import TokenDelta

    # a prompt of 4, 3 tokens delivered before the worker died, 2 more from the continuation:
    # the sample's routes cover 4 + 5 - 1 positions, whatever the continuation's delta holds
    state = _SampleState(token_ids=[5, 6, 7], text="")
    cont = _Seam(0, state, validator.tokenizer, SamplingParams(return_routed_experts=True), prompt_len=4)
    routes = np.arange(10 * 2, dtype=np.int16).reshape(10, 2, 1)
    first = cont.feed(TokenDelta(0, (8,), None, (1,), ""))
    last = cont.feed(TokenDelta(0, (9,), None, (1,), "", finish_reason="length", routed_experts=routes))
    assert first is not None and first.routed_experts is None
    assert last is not None and last.routed_experts is not None
    np.testing.assert_array_equal(last.routed_experts, routes[: 4 + 5 - 1])


def test_return_routed_experts_reaches_sampling_and_a_dense_model_refuses_it(validator):
    req = CompletionRequest(model="m", prompt="x", return_routed_experts=True)
    sp = translate.sampling_params(req, 4, [1], 64)
    assert sp.return_routed_experts and not translate.sampling_params(CompletionRequest(model="m", prompt="x"), 4, [1],
                                                                      64).return_routed_experts
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        validator.validate([1, 2], sp)  # the Job turns this into a 400 before anything is sent
