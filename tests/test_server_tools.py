"""Tool calls and reasoning over HTTP, end to end through the official `openai` client.

A random tiny model never writes a `<tool_call>` on its own, so here the server runs on a
scripted service (the one test double, at the engine boundary): it returns the text a test sets,
as token ids of the real tiny tokenizer, whole or one token per streamed chunk (so tags arrive
split across chunks). Everything above it is the real server: request validation, the chat
template (a Qwen3-style one written here, rendering tools, tool calls and tool responses), the
parsers, the JSON and the SSE. The same features on the real engine (tool_choice in the
prompt, token ids back as the prompt) are tested in tests/test_server.py.
"""

from __future__ import annotations

import json
import shutil

import pytest

from rollout.engine.config import EngineConfig
from rollout.engine.streaming import TokenDelta
from rollout.engine.types import Completion
from rollout.models.config import ModelConfig
from rollout.prompts import PromptValidator
from rollout.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MODEL = "scripted"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
# Qwen3-style: tools in a system turn, calls as <tool_call> JSON, tool results as <tool_response>
QWEN3_STYLE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n<tools>' }}{%- for t in tools %}{{- '\\n' + (t | tojson) }}"
    "{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + (m.content or '') }}"
    "{%- for c in m.tool_calls or [] %}{{- '\\n<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": '"
    " + (c.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + m.content"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CALL_TEXT = 'I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class ScriptedStream:
    """A TokenStream of given deltas."""

    def __init__(self, deltas: list[TokenDelta]):
        self._deltas = deltas
        self.worker = 0

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for delta in self._deltas:
            yield [delta]

    async def aclose(self) -> None:
        pass


class ScriptedService:
    """What the server uses of a RolloutService; every sample is `reply` (then the stop token)."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.tokenizer = Tokenizer.from_pretrained(checkpoint)
        self.engine_config = EngineConfig(max_batch=4, max_seq_len=512)
        self.validator = PromptValidator(ModelConfig.from_pretrained(checkpoint), self.tokenizer, self.engine_config)
        self.version, self.closed = 0, False
        self.reply = ""
        self.prompts: list[list[int]] = []

    def status(self, timeout=None):
        return {"version": 0, "workers": [], "syncs": []}

    def _ids(self, ids) -> list[int]:
        self.prompts.append(list(ids))
        return [*self.tokenizer.encode(self.reply), self.tokenizer.eos_token_ids[0]]

    async def agenerate(self, ids, sampling, *, return_logprobs=True):
        out = self._ids(ids)
        return [Completion(0, i, tuple(ids), tuple(out), self.tokenizer.decode(out),
                           tuple([-0.5] * len(out)) if return_logprobs else None, "stop", 0, tuple([0] * len(out)))
                for i in range(sampling.n)]

    def generate_stream(self, ids, sampling, *, return_logprobs=True):
        out = self._ids(ids)
        deltas = []
        for k, token in enumerate(out):  # one token a chunk: every tag arrives in pieces
            text = self.tokenizer.decode(out[: k + 1])[len(self.tokenizer.decode(out[:k])):]
            deltas.append(TokenDelta(0, (token,), (-0.5,) if return_logprobs else None, (0,), text,
                                     "stop" if k == len(out) - 1 else None))
        return ScriptedStream(deltas)


@pytest.fixture(scope="module")
def checkpoint(tiny_qwen3, tmp_path_factory):
    path = tmp_path_factory.mktemp("scripted") / "tiny"
    shutil.copytree(tiny_qwen3, path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = QWEN3_STYLE_TEMPLATE
    config_file.write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def service(checkpoint):
    return ScriptedService(checkpoint)


@pytest.fixture(scope="module")
def server(service):
    from rollout.server.handle import Server

    srv = Server(service, owns_service=False, host="127.0.0.1", port=0, api_key=None, model_name=MODEL,
                 reasoning_parser="qwen3")
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, **kw)


WEATHER = [{"role": "user", "content": "Weather in Paris?"}]


def test_tool_call_comes_back_as_openai_tool_calls(client, service):
    service.reply = CALL_TEXT
    choice = ask(client, WEATHER, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look it up."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_tool_call_deltas_add_up_to_the_same_call(client, service):
    service.reply = CALL_TEXT + "\n" + CALL_TEXT.split("\n", 1)[1].replace("Paris", "Oslo")
    chunks = list(ask(client, WEATHER, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls: dict[int, dict] = {}
    for chunk in chunks:  # accumulated the way OpenAI's streaming docs say: by index
        for d in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    assert content.strip() == "I will look it up."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert len({c["id"] for c in calls.values()}) == 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "<tool" not in content  # no piece of a tag leaked into the content


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_tool_call_comes_back_as_content(client, service, stream):
    service.reply = 'Here: <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    out = ask(client, WEATHER, tools=TOOLS, stream=stream)
    if stream:
        chunks = list(out)
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        content, finish = out.choices[0].message.content, out.choices[0].finish_reason
        assert out.choices[0].message.tool_calls is None
    assert content == service.reply and finish == "stop"


def test_tool_choice_none_neither_renders_tools_nor_parses_calls(client, service):
    service.reply = CALL_TEXT
    choice = ask(client, WEATHER, tools=TOOLS, tool_choice="none").choices[0]
    assert choice.message.content == CALL_TEXT and not choice.message.tool_calls and choice.finish_reason == "stop"
    assert "<tools>" not in service.tokenizer.decode(service.prompts[-1], skip_special_tokens=False)


def test_required_tool_choice_without_a_call_returns_the_content(client, service):
    service.reply = "It is sunny, no tool needed."  # decoding is not constrained: said in the docs
    choice = ask(client, WEATHER, tools=TOOLS, tool_choice="required").choices[0]
    assert choice.message.content == service.reply and choice.finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_comes_back_as_reasoning_content(client, service, stream):
    service.reply = "<think>\nParis is in France.\n</think>\n\nIt is sunny."
    out = ask(client, WEATHER, stream=stream)
    if stream:
        chunks = list(out)
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        message = out.choices[0].message
        reasoning, content = message.reasoning_content, message.content
    assert (reasoning, content) == ("Paris is in France.", "It is sunny.")


def test_multi_turn_tool_conversation(client, service):
    """Call, tool result, answer: the assistant's call goes back into the template as a call."""
    messages = list(WEATHER)
    service.reply = "<think>need data</think>" + CALL_TEXT
    first = ask(client, messages, tools=TOOLS, extra_body={"return_token_ids": True}).choices[0]
    assert first.finish_reason == "tool_calls" and first.message.reasoning_content == "need data"
    call = first.message.tool_calls[0]
    messages.append(first.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "celsius": 21}'})
    service.reply = "Clear sky, 21 degrees."
    second = ask(client, messages, tools=TOOLS).choices[0]
    assert second.message.content == "Clear sky, 21 degrees." and second.finish_reason == "stop"
    rendered = service.tokenizer.decode(service.prompts[-1], skip_special_tokens=False)
    assert ('<|im_start|>assistant\nI will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>') in rendered
    assert '<tool_response>\n{"sky": "clear", "celsius": 21}\n</tool_response>' in rendered

    # the same turn, token-exact: the first turn's ids back, only the tool message rendered
    exact = ask(client, [messages[-1]], tools=TOOLS,
                extra_body={"prompt_token_ids": first.prompt_token_ids + first.token_ids,
                            "return_token_ids": True}).choices[0]
    sampled = first.prompt_token_ids + first.token_ids
    assert exact.prompt_token_ids[: len(sampled)] == sampled  # the sampled <think> stays, as sampled
    assert service.prompts[-1] == exact.prompt_token_ids
    added = service.tokenizer.decode(exact.prompt_token_ids[len(sampled):], skip_special_tokens=False)
    assert added == ('\n<|im_start|>user\n<tool_response>\n{"sky": "clear", "celsius": 21}\n</tool_response>'
                     "<|im_end|>\n<|im_start|>assistant\n")


def test_without_the_tool_call_parser_calls_are_text_and_required_is_refused(server, service):
    from rollout.server.handle import Server

    plain = Server(service, owns_service=False, host="127.0.0.1", port=0, api_key=None, model_name=MODEL,
                   tool_call_parser=None)
    try:
        other = openai.OpenAI(base_url=plain.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        service.reply = CALL_TEXT
        choice = ask(other, WEATHER, tools=TOOLS).choices[0]
        assert choice.message.content == CALL_TEXT and not choice.message.tool_calls
        with pytest.raises(openai.BadRequestError, match="tool-call-parser") as info:
            ask(other, WEATHER, tools=TOOLS, tool_choice="required")
        assert info.value.body["param"] == "tool_choice"
    finally:
        plain.shutdown()
