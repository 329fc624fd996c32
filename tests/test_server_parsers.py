"""Tool-call and reasoning parsers, tool_choice and token-exact continuation, without a server.

The streaming parsers are fed the same texts whole, character by character and in random
chunks (tags split across chunks); every feeding must give what the whole-text parse gives.
"""

from __future__ import annotations

import doctest
import itertools
import json
import random

import pytest

pytest.importorskip("fastapi")

from rollout.server import assistant, reasoning, tool_calls, translate
from rollout.server.assistant import AssistantDelta, AssistantParser
from rollout.server.errors import APIError
from rollout.server.reasoning import ReasoningStream, parse_reasoning, starts_in_reasoning
from rollout.server.schema import ChatCompletionRequest
from rollout.server.tool_calls import ToolCall, ToolCallStream, parse_tool_calls
from rollout.tokenizer import Tokenizer

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
TEXTS = [
    "plain answer, no tags at all",
    "Let me check.\n" + CALL,
    CALL + "\n" + CALL.replace("Paris", "Oslo"),
    "a < b and <tool but not a tag; </tool_call> alone",
    "<tool_call>{not json}</tool_call> then text",
    "before <tool_call>{\"name\": \"f\", \"arguments\": {}}",  # cut inside a call (max_tokens)
    "<tool_call>{\"arguments\": {\"x\": 1}}</tool_call>",  # no name: not a call
    "ends with a partial tag <tool_c",
]
THINK_TEXTS = [
    "<think>\nStep one.\nStep two.\n</think>\n\nThe answer is 4.",
    "no thinking here",
    "<think>\ncut while thinking",
    "\n<think>x</think>y",
    "<think></think>" + CALL,
]


def ids():
    return (f"call_{i}" for i in range(100))


def chunkings(text: str, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 5))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [[text], list(text), [text[a:b] for a, b in itertools.pairwise(bounds)]]


def stream_tool_calls(pieces: list[str]) -> tuple[str, list[ToolCall]]:
    s = ToolCallStream(ids())
    content, calls = "", []
    for piece in pieces:
        c, k = s.feed(piece)
        content, calls = content + c, calls + k
    c, k = s.finish()
    return content + c, calls + k


def test_parser_docstring_examples_hold():
    for module in (tool_calls, reasoning, assistant, translate):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_tool_call_becomes_name_and_json_arguments_with_text_around_it_as_content():
    content, calls = parse_tool_calls("Let me check.\n" + CALL, ids())
    assert content == "Let me check."
    assert calls == [ToolCall("call_0", "get_weather", '{"city": "Paris", "unit": "°C"}')]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "°C"}


def test_several_calls_get_distinct_ids():
    _, calls = parse_tool_calls(CALL + "\n" + CALL.replace("Paris", "Oslo"))
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Oslo"]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("text", [
    "<tool_call>{not json}</tool_call> then text",
    "<tool_call>{\"arguments\": {\"x\": 1}}</tool_call>",
    "<tool_call>{\"name\": \"f\", \"arguments\": [1, 2]}</tool_call>",
    "before <tool_call>{\"name\": \"f\", \"arguments\": {}}",
    "<tool_call>" + "[" * 100_000 + "</tool_call>",  # deeper than json parses
])
def test_malformed_or_unclosed_call_stays_content_verbatim(text):
    assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_tool_call_parse_equals_the_whole_parse_however_the_text_is_cut(text):
    whole_content, whole_calls = parse_tool_calls(text, ids())
    for seed in range(3):
        for pieces in chunkings(text, seed):
            content, calls = stream_tool_calls(pieces)
            assert calls == whole_calls
            assert (content.strip() if calls else content) == whole_content


def test_stream_passes_content_on_at_once_and_holds_only_a_possible_tag():
    s = ToolCallStream(ids())
    assert s.feed("Hello wor") == ("Hello wor", [])
    assert s.feed("ld <tool_") == ("ld ", [])  # "<tool_" may begin a call: held
    assert s.feed("x") == ("<tool_x", [])  # it did not


@pytest.mark.parametrize("text", THINK_TEXTS)
def test_streamed_reasoning_split_equals_the_whole_split_however_the_text_is_cut(text):
    whole = parse_reasoning(text)
    for seed in range(3):
        for pieces in chunkings(text, seed):
            s = ReasoningStream()
            r, c = "", ""
            for piece in pieces:
                dr, dc = s.feed(piece)
                r, c = r + dr, c + dc
            dr, dc = s.finish()
            r, c = r + dr, c + dc
            assert ((r if s.saw_reasoning else None), c) == whole


def test_reasoning_split_of_qwen3_output():
    assert parse_reasoning(THINK_TEXTS[0]) == ("Step one.\nStep two.", "The answer is 4.")
    assert parse_reasoning("no thinking here") == (None, "no thinking here")
    assert parse_reasoning("<think>\ncut while thinking") == ("cut while thinking", "")


def test_a_think_block_opened_by_the_prompt_starts_the_output_in_reasoning():
    prompt = "<|im_start|>assistant\n<think>\n"
    assert starts_in_reasoning(prompt)
    assert parse_reasoning("hmm\n</think>\n\nYes.", in_reasoning=starts_in_reasoning(prompt)) == ("hmm", "Yes.")
    assert not starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_assistant_parser_streamed_adds_up_to_the_whole_parse():
    text = "<think>need weather</think>\n\nChecking.\n" + CALL
    whole = AssistantParser(reasoning=True, tools=True, ids=ids()).parse(text)
    assert whole.reasoning == "need weather" and whole.content == "Checking." and len(whole.tool_calls) == 1
    parser = AssistantParser(reasoning=True, tools=True, ids=ids())
    total = AssistantDelta()
    for ch in text:
        total += parser.feed(ch)
    total += parser.finish()
    assert (total.reasoning, total.content.strip(), total.tool_calls) == (whole.reasoning, whole.content,
                                                                          whole.tool_calls)


def test_without_tools_calls_stay_text():
    parsed = AssistantParser(reasoning=False, tools=False).parse(CALL)
    assert parsed.content == CALL and parsed.tool_calls == []


# -- tool_choice and token-exact continuation ----------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("f", "g")]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def test_tool_choice_modes():
    assert translate.tool_choice(chat(tools=TOOLS)).mode == "auto" and translate.tool_choice(chat(tools=TOOLS)).parse
    none = translate.tool_choice(chat(tools=TOOLS, tool_choice="none"))
    assert none.tools is None and not none.parse  # not rendered, not parsed
    assert translate.tool_choice(chat(tools=TOOLS, tool_choice="required")).tools == TOOLS
    named = translate.tool_choice(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}))
    assert named.tools == [TOOLS[1]] and named.parse
    assert not translate.tool_choice(chat()).parse


@pytest.mark.parametrize("kw, message", [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "h"}}), "not in `tools`"),
    (dict(tool_choice="required"), "needs `tools`"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "is invalid"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": "f"}), "is invalid"),
])
def test_bad_tool_choice_is_a_400_naming_tool_choice(kw, message):
    with pytest.raises(APIError, match=message) as info:
        translate.tool_choice(chat(**kw))
    assert info.value.status == 400 and info.value.param == "tool_choice"


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return Tokenizer.from_pretrained(tiny_qwen3)


def test_continued_prompt_keeps_the_sampled_ids_and_adds_what_the_template_adds(tokenizer):
    user = {"role": "user", "content": "What is 2+2?"}
    answer, tool = "Let me compute.", {"role": "tool", "content": "4"}
    eos = tokenizer.eos_token_ids[0]
    sampled = [*tokenizer.encode(answer), eos]  # the model's turn, ended by its stop token
    prefix = tokenizer.apply_chat_template([user], tokenize=True) + sampled
    ids = translate.continued_prompt(prefix, [tool], tokenizer)
    assert ids[: len(prefix)] == prefix
    full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": answer}, tool], tokenize=True)
    assert ids == full  # here the sampled ids are what the template would write, so both agree


def test_continued_prompt_never_retokenizes_the_sampled_ids(tokenizer):
    user = {"role": "user", "content": "Hi"}
    odd = [72, 300, 301]  # ids a tokenizer would not produce for their text: kept as they are
    prefix = tokenizer.apply_chat_template([user], tokenize=True) + odd  # cut by max_tokens: no stop token
    ids = translate.continued_prompt(prefix, [{"role": "user", "content": "more"}], tokenizer)
    assert ids[: len(prefix)] == prefix
    rest = tokenizer.decode(ids[len(prefix):], skip_special_tokens=False)
    assert rest == "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"  # the turn is closed


def test_assistant_tool_calls_reach_the_template_with_object_arguments_and_bad_json_is_a_400():
    call = {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    message = translate._plain_message({"role": "assistant", "content": None, "tool_calls": [call]}, 1)
    assert message["content"] == "" and message["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    bad = {**call, "function": {"name": "f", "arguments": "{x"}}
    with pytest.raises(APIError, match=r"messages\[1\].tool_calls: the arguments of 'f' are not JSON"):
        translate._plain_message({"role": "assistant", "tool_calls": [bad]}, 1)


def test_continuing_nothing_is_a_400(tokenizer):
    with pytest.raises(APIError, match="prompt_token_ids is empty"):
        translate.continued_prompt([], [{"role": "user", "content": "x"}], tokenizer)
    with pytest.raises(APIError, match="send the messages that follow"):
        translate.continued_prompt([1, 2], [], tokenizer)


def test_serve_takes_the_parser_options_and_refuses_unknown_ones():
    from rollout.cli import build_parser
    from rollout.server.state import ServerState

    args = build_parser().parse_args(["serve", "m", "--reasoning-parser", "qwen3", "--tool-call-parser", "none"])
    assert (args.reasoning_parser, args.tool_call_parser) == ("qwen3", "none")
    defaults = build_parser().parse_args(["serve", "m"])
    assert (defaults.reasoning_parser, defaults.tool_call_parser) == (None, "hermes")
    with pytest.raises(ValueError, match="reasoning_parser='deepseek' is unknown"):
        ServerState(None, "m", None, reasoning_parser="deepseek")
