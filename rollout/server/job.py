"""One generation request as the server handles it: validated and encoded at once, then
answered as one JSON response or as a stream of OpenAI-style chunks.

A Job raises a 400 APIError for anything wrong with the request before anything is sent to
the fleet (every prompt encoded and checked against the context length and the slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion
from rollout.server import translate
from rollout.server.assistant import AssistantDelta, AssistantParser
from rollout.server.errors import bad_request, from_exception
from rollout.server.reasoning import starts_in_reasoning
from rollout.server.sse import DONE, event, merge_streams
from rollout.server.state import ServerState


class Job:
    """One validated generation request: its prompts, sampling and what the reply must carry."""

    def __init__(self, state: ServerState, req: Any, endpoint: str):
        self.state = state
        self.req = req
        self.endpoint = endpoint
        self.chat = endpoint == "chat.completions"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.start = time.perf_counter()
        validator = state.service.validator
        if self.chat:
            self.want_logprobs = bool(req.logprobs)
            self.prompts = [translate.chat_prompt(req, validator)]
            self.tools = translate.tool_choice(req)
            if state.tool_call_parser is None and self.tools.mode in ("required", "function"):
                raise bad_request(f"tool_choice={req.tool_choice!r} asks for tool_calls, but this server returns "
                                  "calls as text (it runs with --tool-call-parser none); send tool_choice 'auto' "
                                  "or 'none', or restart it with --tool-call-parser hermes", "tool_choice")
            self.parse_tools = self.tools.parse and state.tool_call_parser is not None
            self.parse_reasoning = state.reasoning_parser is not None
            self.in_reasoning = self.parse_reasoning and starts_in_reasoning(
                validator.tokenizer.decode(self.prompts[0][-16:], skip_special_tokens=False))
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        else:
            self.want_logprobs = req.logprobs is not None
            self.prompts = translate.completion_prompts(req, validator)
            max_tokens = req.max_tokens
        self.sampling: SamplingParams = translate.sampling_params(
            req, max_tokens, [len(p) for p in self.prompts], state.max_seq_len, translate.top_logprobs(req))
        for i, ids in enumerate(self.prompts):  # every prompt, before any is queued
            try:
                validator.validate(ids, self.sampling)
            except (TypeError, ValueError) as err:
                where = f"prompt {i}: " if len(self.prompts) > 1 else ""
                raise bad_request(where + str(err).replace("max_seq_len", "the context length (max_seq_len)"),
                                  "messages" if self.chat else "prompt") from err

    def parser(self) -> AssistantParser:
        """A fresh parser of one chat choice's text (reasoning and tool calls, as configured)."""
        return AssistantParser(reasoning=self.parse_reasoning, tools=self.parse_tools, in_reasoning=self.in_reasoning)

    def message(self, parsed: AssistantDelta) -> dict[str, Any]:
        """The assistant message of a whole choice (OpenAI: content null when there are only calls)."""
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if self.parse_reasoning:
            message["reasoning_content"] = parsed.reasoning or None
        if parsed.tool_calls:
            message["content"] = parsed.content or None
            message["tool_calls"] = [call.openai() for call in parsed.tool_calls]
        return message

    def delta(self, parsed: AssistantDelta, calls_sent: int) -> dict[str, Any]:
        """The `delta` of a streamed chat chunk: the text pieces, and each call whole, numbered on."""
        delta: dict[str, Any] = {"content": parsed.content}
        if parsed.reasoning:
            delta["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            delta["tool_calls"] = [{"index": calls_sent + k, **call.openai()} for k, call in enumerate(parsed.tool_calls)]
        return delta

    def choice_index(self, prompt: int, sample: int) -> int:
        return prompt * self.sampling.n + sample

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return translate.usage([len(p) for p in self.prompts], self.sampling.n, completion_tokens)

    # -- non-streaming

    def response(self, groups: list[list[Completion]]) -> dict[str, Any]:
        choices = []
        for p, group in enumerate(groups):
            for c in group:
                choice: dict[str, Any] = {"index": self.choice_index(p, c.sample_index)}
                if self.chat:
                    parsed = self.parser().parse(c.text)
                    choice["message"] = self.message(parsed)
                    choice["logprobs"] = (translate.chat_logprobs(c.token_ids, c.logprobs or (), self.state.texts,
                                                                  c.top_logprobs)
                                          if self.want_logprobs else None)
                else:
                    choice["text"] = c.text
                    choice["logprobs"] = (translate.completion_logprobs(c.token_ids, c.logprobs or (),
                                                                        self.state.texts, 0, c.top_logprobs)
                                          if self.want_logprobs else None)
                choice["finish_reason"] = c.finish_reason
                if self.chat and parsed.tool_calls and c.finish_reason == "stop":
                    choice["finish_reason"] = "tool_calls"
                choice.update(translate.extra_fields(c, self.prompts[p], self.req.return_token_ids))
                choices.append(choice)
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": choices,
                "usage": self.usage(tokens)}

    # -- streaming

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        payload: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                   "created": self.created, "model": self.state.model_name, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return event(payload)

    async def events(self, streams: list[Any]) -> AsyncIterator[str]:
        metrics = self.state.metrics
        started: set[int] = set()
        offsets: dict[int, int] = {}
        parsers: dict[int, AssistantParser] = {}  # chat: per choice
        calls_sent: dict[int, int] = {}
        tokens = 0
        first_token_s: float | None = None
        status = 200
        metrics.running.inc()
        try:
            async for p, deltas in merge_streams(streams):
                choices = []
                for d in deltas:
                    index = self.choice_index(p, d.sample_index)
                    if d.token_ids and first_token_s is None:
                        first_token_s = time.perf_counter() - self.start
                    tokens += len(d.token_ids)
                    choice: dict[str, Any] = {"index": index}
                    if self.chat:
                        parser = parsers.setdefault(index, self.parser())
                        parsed = parser.feed(d.text)
                        if d.finish_reason is not None:
                            parsed += parser.finish()
                        delta = self.delta(parsed, calls_sent.get(index, 0))
                        calls_sent[index] = calls_sent.get(index, 0) + len(parsed.tool_calls)
                        if index not in started:
                            delta = {"role": "assistant", **delta}
                        choice["delta"] = delta
                        choice["logprobs"] = (translate.chat_logprobs(d.token_ids, d.logprobs or (), self.state.texts,
                                                                      d.top_logprobs)
                                              if self.want_logprobs else None)
                    else:
                        choice["text"] = d.text
                        lp = None
                        if self.want_logprobs:
                            lp = translate.completion_logprobs(d.token_ids, d.logprobs or (), self.state.texts,
                                                               offsets.get(index, 0), d.top_logprobs)
                            offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
                        choice["logprobs"] = lp
                    choice["finish_reason"] = d.finish_reason
                    if d.finish_reason == "stop" and calls_sent.get(index):
                        choice["finish_reason"] = "tool_calls"
                    first = index not in started
                    started.add(index)
                    choice.update(translate.extra_fields(d, self.prompts[p] if first else None,
                                                         self.req.return_token_ids))
                    choices.append(choice)
                yield self.chunk(choices)
            options = self.req.stream_options
            if options is not None and options.include_usage:
                yield self.chunk([], self.usage(tokens))
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client closed the connection (nginx's code): cancelled on the worker
            metrics.cancelled.inc(endpoint=self.endpoint)
            raise
        except Exception as err:  # noqa: BLE001 - the status line is sent: report it in the stream
            api_error = from_exception(err)
            status = api_error.status
            yield event(api_error.body())
        finally:
            for stream in streams:  # stops requests still running (a client that went away)
                with contextlib.suppress(Exception):
                    await stream.aclose()
            metrics.running.inc(-1)
            metrics.request_done(self.endpoint, status, prompt_tokens=sum(len(p) for p in self.prompts),
                                 completion_tokens=tokens, latency_s=time.perf_counter() - self.start,
                                 first_token_s=first_token_s)
        yield DONE
