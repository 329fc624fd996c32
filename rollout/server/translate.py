"""OpenAI requests -> rollout prompts and SamplingParams; rollout outputs -> OpenAI JSON.

Pure functions over the tokenizer and the engine limits (no Ray, no HTTP), so the whole mapping
is unit-testable. Each choice carries rollout's `weight_version` (the version that produced its
last token) and, with `return_token_ids`, `prompt_token_ids`, `token_ids` and `token_versions`;
with `return_routed_experts` (MoE models), `routed_experts` as nested lists [prompt + completion
tokens - 1][MoE layers][top_k] (Completion.routed_experts; a stream sends it in the sample's
last chunk).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from rollout.engine.alternatives import MAX_TOP_LOGPROBS, TopLogprobs
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.streaming import TokenDelta
from rollout.engine.types import Completion
from rollout.prompts import PromptValidator
from rollout.server.errors import bad_request
from rollout.server.schema import ChatCompletionRequest, CompletionRequest, _Sampling


def completion_prompts(req: CompletionRequest, validator: PromptValidator) -> list[list[int]]:
    """The token ids of each prompt of a completions request (a string, strings, ids, id lists)."""
    p = req.prompt
    if isinstance(p, str):
        raw: list[Any] = [p]
    elif p and all(isinstance(x, int) for x in p):
        raw = [p]
    else:
        raw = list(p)
    if not raw:
        raise bad_request("prompt is empty: expected a string, a list of strings, or token id list(s)", "prompt")
    return [validator.encode(x) for x in raw]


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    """What a chat request's `tools` / `tool_choice` mean here.

    `tools`: the tool list the chat template renders (none for "none"; only the named one for a
    named function). `parse`: whether calls in the output become `tool_calls`. Decoding is not
    constrained: under "required" or a named function the model is shown the tools (and only
    the named one), but an answer without a call still comes back as content (finish_reason
    "stop"), never as an error, and never as an invented call.
    """

    mode: str  # "none" | "auto" | "required" | "function"
    tools: list[dict[str, Any]] | None
    name: str | None = None

    @property
    def parse(self) -> bool:
        return self.mode != "none" and bool(self.tools)


def tool_choice(req: ChatCompletionRequest) -> ToolChoice:
    """The request's ToolChoice; a 400 for a tool_choice that names nothing the request offers.

    >>> tools = [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "g"}}]
    >>> req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
    ...                             tool_choice={"type": "function", "function": {"name": "g"}})
    >>> tool_choice(req)
    ToolChoice(mode='function', tools=[{'type': 'function', 'function': {'name': 'g'}}], name='g')
    """
    tools, choice = req.tools or None, req.tool_choice
    if choice is None:
        return ToolChoice("auto" if tools else "none", tools)
    if choice == "none":
        return ToolChoice("none", None)
    if choice in ("auto", "required"):
        if not tools and choice == "required":
            raise bad_request("tool_choice='required' needs `tools`: send the functions the model may call",
                              "tool_choice")
        return ToolChoice(choice, tools)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or (isinstance(choice, dict) and choice.get("type", "function") != "function"):
        raise bad_request(f"tool_choice={choice!r} is invalid: expected 'none', 'auto', 'required' or "
                          "{'type': 'function', 'function': {'name': NAME}}", "tool_choice")
    named = [t for t in tools or [] if isinstance(t, dict) and (t.get("function") or {}).get("name") == name]
    if not named:
        offered = [(t.get("function") or {}).get("name") for t in tools or [] if isinstance(t, dict)]
        raise bad_request(f"tool_choice names the function {name!r}, which is not in `tools` ({offered}); "
                          "name one of them or add it to `tools`", "tool_choice")
    return ToolChoice("function", named, name)


def chat_prompt(req: ChatCompletionRequest, validator: PromptValidator) -> list[int]:
    """The token ids of a chat request, rendered by the checkpoint's chat template.

    Content given as a list of parts is joined from its text parts; the tools of `tool_choice`
    (ToolChoice.tools), `enable_thinking` and `chat_template_kwargs` reach the template as
    keyword arguments, as in transformers. Assistant messages that carry OpenAI `tool_calls`
    get their `arguments` as objects (what chat templates such as Qwen3's render).
    """
    messages = [_plain_message(m, i) for i, m in enumerate(req.messages)]
    kwargs = dict(req.chat_template_kwargs or {})
    if req.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", req.enable_thinking)
    tools = tool_choice(req).tools
    if tools:
        kwargs["tools"] = tools
    if req.prompt_token_ids is not None:
        return continued_prompt(req.prompt_token_ids, messages, validator.tokenizer,
                                add_generation_prompt=req.add_generation_prompt, **kwargs)
    return list(validator.tokenizer.apply_chat_template(
        messages, add_generation_prompt=req.add_generation_prompt, tokenize=True, **kwargs
    ))


# Stand-ins for the conversation before the new messages: the template renders them, and only
# what it writes after the assistant's stand-in is kept.
_EARLIER_USER = "\u2063rollout-earlier-user\u2063"
_EARLIER_ASSISTANT = "\u2063rollout-earlier-assistant\u2063"


def continued_prompt(prefix: Sequence[int], messages: list[dict[str, Any]], tokenizer: Any, *,
                     add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
    """`prefix` (a conversation so far as token ids, ending with a model turn exactly as sampled)
    followed by what the chat template adds for `messages` after an assistant turn.

    Nothing in `prefix` is re-tokenized. The template renders a stand-in conversation (a user
    turn, an assistant turn) plus `messages`; the text after the assistant's stand-in content is
    what a turn adds: the assistant's closing (e.g. `<|im_end|>`), which is left out when
    `prefix` already ends with that end-of-sequence token (the sampled stop), then the new
    messages and the generation prompt.
    """
    if not prefix:
        raise bad_request("prompt_token_ids is empty: send the conversation so far as token ids (a reply's "
                          "prompt_token_ids + token_ids), or leave it out and send every message", "prompt_token_ids")
    if not messages:
        raise bad_request("prompt_token_ids continues a conversation: send the messages that follow it "
                          "(tool results, the next user turn) in `messages`", "messages")
    stand_in = [{"role": "user", "content": _EARLIER_USER}, {"role": "assistant", "content": _EARLIER_ASSISTANT}]
    text = tokenizer.apply_chat_template(stand_in + messages, add_generation_prompt=add_generation_prompt,
                                         tokenize=False, **kwargs)
    at = text.rfind(_EARLIER_ASSISTANT)
    if at < 0:
        raise bad_request("the chat template does not write an assistant message's content verbatim, so the "
                          "text a new turn adds cannot be told apart; send the whole conversation in "
                          "`messages` instead of prompt_token_ids", "prompt_token_ids")
    added = text[at + len(_EARLIER_ASSISTANT):]
    if int(prefix[-1]) in tokenizer.eos_token_ids:
        closing = tokenizer.decode([int(prefix[-1])], skip_special_tokens=False)
        added = added.removeprefix(closing)
    return [int(t) for t in prefix] + list(tokenizer.encode(added))


def _plain_message(message: dict[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(message.get("role"), str):
        raise bad_request(f"messages[{index}] has no 'role' string: expected {{'role': ..., 'content': ...}}",
                          "messages")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"messages[{index}].content has a {kind!r} part; only text parts are "
                                  "supported (the models served are text-only)", "messages")
            parts.append(str(part.get("text", "")))
        message = {**message, "content": "".join(parts)}
    if message.get("tool_calls"):
        if message.get("content") is None:
            message = {**message, "content": ""}
        message = {**message, "tool_calls": [_template_call(c, index) for c in message["tool_calls"]]}
    return message


def _template_call(call: Any, index: int) -> dict[str, Any]:
    """An OpenAI tool call of an assistant message, its arguments JSON text made an object."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"messages[{index}].tool_calls has {call!r}; expected {{'id': ..., 'type': 'function', "
                          "'function': {'name': ..., 'arguments': JSON text}}", "messages")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as err:
            raise bad_request(f"messages[{index}].tool_calls: the arguments of {function['name']!r} are not "
                              f"JSON ({err}); send the arguments text the server returned", "messages") from err
    return {**call, "function": {**function, "arguments": arguments}}


def constraint(req: _Sampling) -> dict[str, Any]:
    """The SamplingParams structured-output field of the request (json_schema / regex /
    grammar), {} when its output is free; a 400 for an unknown or malformed response_format or
    more than one constraint."""
    fields: dict[str, Any] = {}
    fmt = req.response_format
    if fmt is not None and fmt.get("type") not in (None, "text"):
        kind = fmt.get("type")
        if kind == "json_object":
            fields["json_schema"] = {"type": "object"}
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("response_format json_schema needs {'type': 'json_schema', 'json_schema': "
                                  "{'name': ..., 'schema': {a JSON schema object}}}", "response_format")
            fields["json_schema"] = schema
        else:
            raise bad_request(f"response_format type {kind!r} is not supported: expected 'text', 'json_object' or "
                              "'json_schema'", "response_format")
    for name in ("regex", "grammar"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    if len(fields) > 1:
        given = ["response_format" if f == "json_schema" else f for f in fields]
        raise bad_request(f"{', '.join(given)} are set; a request follows at most one constraint", given[0])
    return fields


def sampling_params(req: _Sampling, max_tokens: int | None, prompt_lens: Sequence[int], max_seq_len: int,
                    top_logprobs: int = 0) -> SamplingParams:
    """SamplingParams for the request; ValueError (a 400) for values out of range.

    With no max_tokens (chat), a sample may use all of the context the longest prompt leaves.
    """
    if max_tokens is None:
        max_tokens = max_seq_len - max(prompt_lens)
        if max_tokens < 1:
            raise bad_request(f"the prompt has {max(prompt_lens)} tokens, which fills the context "
                              f"(max_seq_len={max_seq_len}); shorten the messages", "messages")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(f"top_k={req.top_k} is invalid: expected -1 or 0 (off) or a positive integer", "top_k")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            n=req.n,
            seed=req.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            return_routed_experts=req.return_routed_experts,
            top_logprobs=top_logprobs,
            **constraint(req),
        )
    except ValueError as err:
        field = str(err).split("=")[0].removeprefix("SamplingParams.")
        raise bad_request(str(err).replace("SamplingParams.", ""), field) from err


def usage(prompt_lens: Sequence[int], n: int, completion_tokens: int) -> dict[str, int]:
    prompt = sum(prompt_lens)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


@dataclasses.dataclass
class TokenTexts:
    """Per-token text for logprobs (each token decoded alone, special tokens kept)."""

    tokenizer: Any

    def __call__(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def completion_logprobs(ids: Sequence[int], logprobs: Sequence[float], texts: TokenTexts, offset: int,
                        top: TopLogprobs | None = None) -> dict[str, Any]:
    """OpenAI's completions `logprobs`; `top_logprobs` a {token text: logprob} dict per token
    (tokens whose texts coincide keep the likelier one's), or None without `top`."""
    tokens = texts(ids)
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    alternatives = None
    if top is not None:
        alternatives = []
        for row in top.rows():
            listed: dict[str, float] = {}
            for text, lp in zip(texts([i for i, _ in row]), (lp for _, lp in row)):
                listed.setdefault(text, lp)
            alternatives.append(listed)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": alternatives, "text_offset": offsets}


def chat_logprobs(ids: Sequence[int], logprobs: Sequence[float], texts: TokenTexts,
                  top: TopLogprobs | None = None) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: per token {token, logprob, bytes, top_logprobs: [{token,
    logprob, bytes}, ...] (most likely first; empty without `top`)}."""
    rows = top.rows() if top is not None else [[] for _ in ids]
    return {"content": [
        {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
         "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode("utf-8"))}
                          for a, alp in zip(texts([i for i, _ in row]), (alp for _, alp in row))]}
        for t, lp, row in zip(texts(ids), logprobs, rows)
    ]}


def top_logprobs(req: CompletionRequest | ChatCompletionRequest) -> int:
    """How many alternatives per token a request asks for (completions: `logprobs`; chat:
    `top_logprobs`, which needs `logprobs: true`); a 400 outside [0, MAX_TOP_LOGPROBS]."""
    field = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
    n = req.top_logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs
    if n is None:
        return 0
    if not 0 <= n <= MAX_TOP_LOGPROBS:
        raise bad_request(f"{field}={n} is out of range: expected an integer in [0, {MAX_TOP_LOGPROBS}] "
                          f"(at most {MAX_TOP_LOGPROBS} alternatives per token)", field)
    if isinstance(req, ChatCompletionRequest) and n and not req.logprobs:
        raise bad_request(f"top_logprobs={n} needs logprobs=true: send both, or leave top_logprobs out",
                          "top_logprobs")
    return n


def extra_fields(c: Completion | TokenDelta, prompt_ids: Sequence[int] | None, return_token_ids: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    versions = c.token_versions
    if versions:
        out["weight_version"] = versions[-1]
    elif isinstance(c, Completion):
        out["weight_version"] = c.weight_version
    if return_token_ids:
        if prompt_ids is not None:
            out["prompt_token_ids"] = list(prompt_ids)
        out["token_ids"] = list(c.token_ids)
        out["token_versions"] = list(versions)
    if c.routed_experts is not None:  # asked for (return_routed_experts): the sample's last chunk
        out["routed_experts"] = c.routed_experts.tolist()
    return out
