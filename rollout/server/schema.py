"""Request bodies of the OpenAI-compatible endpoints (pydantic), with rollout's extra fields.

The standard fields follow OpenAI's API. Extra fields (sent by the `openai` client through
`extra_body`): `top_k`, `stop_token_ids`, `ignore_eos`, `return_token_ids` (each choice then
carries `prompt_token_ids`, `token_ids` and `token_versions`), `return_routed_experts`
(mixture-of-experts models: each choice then carries `routed_experts`, [positions][MoE
layers][top_k], on a stream in the sample's last chunk), and for chat
`chat_template_kwargs` / `enable_thinking` (passed to the chat template, like transformers'
`apply_chat_template(**kwargs)`), and `prompt_token_ids` (the conversation so far as token ids,
exactly as returned; `messages` then holds only the messages after it, so nothing sampled
is re-tokenized). Structured output: OpenAI's `response_format` (json_object, json_schema) on
both endpoints, and the extras `regex` and `grammar` (a Lark grammar); see
rollout.engine.structured. With `tools`, calls the model writes come back as OpenAI `tool_calls`
(rollout.server.tool_calls; `tool_choice` in rollout.server.translate). Unknown fields are
ignored, as OpenAI-compatible servers do;
known OpenAI features this server does not implement are refused with a 400 rather than
silently ignored (see `unsupported`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = 1
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI features not implemented here (refused when set to a non-default value)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # rollout / vLLM-style extras
    top_k: int | None = None  # 0 or -1: off
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    return_routed_experts: bool = False  # MoE models: each choice's routed_experts (routing replay)
    # structured output: OpenAI's {"type": "json_object"} / {"type": "json_schema", "json_schema":
    # {"schema": ...}} ("text": free), or the extras `regex` / `grammar` (Lark); at most one
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None

    def unsupported(self) -> list[str]:
        out = []
        if self.presence_penalty:
            out.append("presence_penalty")
        if self.frequency_penalty:
            out.append("frequency_penalty")
        if self.logit_bias:
            out.append("logit_bias")
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None  # N: the chosen token's logprob plus the N most likely (N <= 20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.echo:
            out.append("echo")
        if self.suffix:
            out.append("suffix")
        if self.best_of is not None and self.best_of != self.n:
            out.append("best_of")
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None  # wins over max_tokens (OpenAI's newer name)
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token (N <= 20; needs logprobs=true)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None  # every call the model writes is returned either way
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    add_generation_prompt: bool = True
    # token-exact multi-turn: the conversation so far as ids (a reply's prompt_token_ids + token_ids);
    # `messages` then holds only the messages after it (rollout.server.translate.continued_prompt)
    prompt_token_ids: list[int] | None = None



class WeightsRequest(BaseModel):
    """`POST /v1/weights`: sync the fleet from an HF checkpoint directory or repo id."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, description="HF checkpoint directory or repo id, readable on every worker")


Endpoint = Literal["completions", "chat.completions"]
