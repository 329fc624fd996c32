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
from collections.abc import Sequence
from typing import Any

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


def chat_prompt(req: ChatCompletionRequest, validator: PromptValidator) -> list[int]:
    """The token ids of a chat request, rendered by the checkpoint's chat template.

    Content given as a list of parts is joined from its text parts; `tools`, `enable_thinking`
    and `chat_template_kwargs` reach the template as keyword arguments, as in transformers.
    """
    messages = [_plain_message(m, i) for i, m in enumerate(req.messages)]
    kwargs = dict(req.chat_template_kwargs or {})
    if req.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", req.enable_thinking)
    if req.tools:
        kwargs["tools"] = req.tools
    return list(validator.tokenizer.apply_chat_template(
        messages, add_generation_prompt=req.add_generation_prompt, tokenize=True, **kwargs
    ))


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
    return message


def sampling_params(req: _Sampling, max_tokens: int | None, prompt_lens: Sequence[int], max_seq_len: int) -> SamplingParams:
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


def completion_logprobs(ids: Sequence[int], logprobs: Sequence[float], texts: TokenTexts, offset: int) -> dict[str, Any]:
    tokens = texts(ids)
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(ids: Sequence[int], logprobs: Sequence[float], texts: TokenTexts) -> dict[str, Any]:
    return {"content": [
        {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
        for t, lp in zip(texts(ids), logprobs)
    ]}


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
