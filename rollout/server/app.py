"""The HTTP application (FastAPI): OpenAI-compatible generation, admin routes, health, metrics.

    POST /v1/completions, POST /v1/chat/completions   (JSON, or SSE with "stream": true)
    GET  /v1/models
    POST /v1/weights   {"source": HF dir or repo id}  -> {"version": ..., "sync": {...}}
    GET  /v1/status    RolloutService.status()
    GET  /health, GET /metrics (Prometheus text)

Every /v1 route needs the api key when one is set. A request is parsed, validated and encoded
completely (all prompts) before anything is sent to the fleet, so bad input queues nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion
from rollout.server import translate
from rollout.server.auth import check_key
from rollout.server.errors import APIError, bad_request, from_exception
from rollout.server.metrics import ServerMetrics
from rollout.server.schema import ChatCompletionRequest, CompletionRequest, WeightsRequest
from rollout.server.sse import DONE, SSEResponse, event, merge_streams

log = logging.getLogger("rollout.server")

_FLEET_REFRESH_S = 5.0


class ServerState:
    """What the routes share: the service, the served name, the key, the metrics."""

    def __init__(self, service: Any, model_name: str, api_key: str | None):
        self.service = service
        self.model_name = model_name
        self.api_key = api_key
        self.metrics = ServerMetrics()
        self.texts = translate.TokenTexts(service.tokenizer)
        self.max_seq_len = service.engine_config.max_seq_len
        self.closing = False
        self.created = int(time.time())

    def check_open(self) -> None:
        if self.closing or self.service._closed:
            raise APIError(503, "the server is shutting down (its rollout service is closed); retry against "
                           "a running server", type="service_unavailable", code="service_unavailable")

    def check_model(self, name: str) -> None:
        if name not in (self.model_name, str(self.service.checkpoint)):
            raise APIError(404, f"model {name!r} does not exist here: this server serves {self.model_name!r} "
                           "(GET /v1/models lists it)", param="model", code="model_not_found")


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        refresh = asyncio.ensure_future(_refresh_loop(state))  # fleet gauges for Ray's metrics
        try:
            yield
        finally:
            refresh.cancel()

    app = FastAPI(title="rollout", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.rollout = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return bad_request(_validation_message(err.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _any(_: Request, err: Exception) -> JSONResponse:
        return from_exception(err).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        state.check_open()
        return JSONResponse({"status": "ok", "model": state.model_name, "weight_version": state.service.version})

    @app.get("/metrics")
    async def metrics() -> Response:
        await _refresh_fleet(state)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_key(request.headers.get("authorization"), state.api_key)
        return JSONResponse({"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "rollout",
            "root": str(state.service.checkpoint), "max_model_len": state.max_seq_len,
            "weight_version": state.service.version,
        }]})

    @app.get("/v1/status")
    async def status(request: Request) -> JSONResponse:
        check_key(request.headers.get("authorization"), state.api_key)
        state.check_open()
        return JSONResponse(await asyncio.to_thread(state.service.status))

    @app.post("/v1/weights")
    async def weights(request: Request) -> JSONResponse:
        check_key(request.headers.get("authorization"), state.api_key)
        state.check_open()
        req = await _parse(request, WeightsRequest)
        source = os.path.expanduser(req.source)
        if source.startswith((os.sep, ".", "~")) and not os.path.isdir(source):
            raise bad_request(f"source {req.source!r} is not a checkpoint directory on the server's host; pass an "
                              "HF checkpoint directory readable by the server and every worker, or a repo id",
                              "source")
        try:
            version = await asyncio.to_thread(state.service.sync_weights, source)
        except Exception as err:
            state.metrics.syncs.inc(status="error")
            return from_exception(err).response()
        state.metrics.syncs.inc(status="ok")
        syncs = (await asyncio.to_thread(state.service.status))["syncs"]
        record = next((s for s in reversed(syncs) if s["version"] == version), None)
        await _refresh_fleet(state)
        return JSONResponse({"version": version, "sync": record})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, CompletionRequest, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, ChatCompletionRequest, "chat.completions")

    return app


# -- generation -------------------------------------------------------------------------------------


class _Job:
    """One validated generation request: its prompts, sampling and what the reply must carry."""

    def __init__(self, state: ServerState, req: Any, endpoint: str):
        self.state = state
        self.req = req
        self.endpoint = endpoint
        self.chat = endpoint == "chat.completions"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.start = time.perf_counter()
        validator = state.service._validator
        if self.chat:
            if req.top_logprobs:
                raise bad_request(
                    f"top_logprobs={req.top_logprobs}: this server returns the log-probability of each sampled "
                    "token only (the engine does not compute alternatives); send logprobs=true with "
                    "top_logprobs=0 or omit it", "top_logprobs")
            self.want_logprobs = bool(req.logprobs)
            self.prompts = [translate.chat_prompt(req, validator)]
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        else:
            if req.logprobs is not None and req.logprobs != 0:
                raise bad_request(
                    f"logprobs={req.logprobs} asks for the {req.logprobs} most likely alternatives per token; "
                    "this server returns the sampled token's log-probability only (the engine does not compute "
                    "alternatives): send logprobs=0", "logprobs")
            self.want_logprobs = req.logprobs is not None
            self.prompts = translate.completion_prompts(req, validator)
            max_tokens = req.max_tokens
        self.sampling: SamplingParams = translate.sampling_params(
            req, max_tokens, [len(p) for p in self.prompts], state.max_seq_len)
        for i, ids in enumerate(self.prompts):  # every prompt, before any is queued
            try:
                validator.validate(ids, self.sampling)
            except (TypeError, ValueError) as err:
                where = f"prompt {i}: " if len(self.prompts) > 1 else ""
                raise bad_request(where + str(err).replace("max_seq_len", "the context length (max_seq_len)"),
                                  "messages" if self.chat else "prompt") from err

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
                    choice["message"] = {"role": "assistant", "content": c.text}
                    choice["logprobs"] = (translate.chat_logprobs(c.token_ids, c.logprobs or (), self.state.texts)
                                          if self.want_logprobs else None)
                else:
                    choice["text"] = c.text
                    choice["logprobs"] = (translate.completion_logprobs(c.token_ids, c.logprobs or (),
                                                                        self.state.texts, 0)
                                          if self.want_logprobs else None)
                choice["finish_reason"] = c.finish_reason
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
                        delta: dict[str, Any] = {"content": d.text}
                        if index not in started:
                            delta = {"role": "assistant", **delta}
                        choice["delta"] = delta
                        choice["logprobs"] = (translate.chat_logprobs(d.token_ids, d.logprobs or (), self.state.texts)
                                              if self.want_logprobs else None)
                    else:
                        choice["text"] = d.text
                        lp = None
                        if self.want_logprobs:
                            lp = translate.completion_logprobs(d.token_ids, d.logprobs or (), self.state.texts,
                                                               offsets.get(index, 0))
                            offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
                        choice["logprobs"] = lp
                    choice["finish_reason"] = d.finish_reason
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


async def _generate(state: ServerState, request: Request, model: type[BaseModel], endpoint: str) -> Response:
    try:
        check_key(request.headers.get("authorization"), state.api_key)
        state.check_open()
        req = await _parse(request, model)
        state.check_model(req.model)
        unsupported = req.unsupported()
        if unsupported:
            raise bad_request(f"not supported by this server: {', '.join(unsupported)}; remove them from the "
                              "request", unsupported[0].split(" ")[0])
        job = _Job(state, req, endpoint)
    except Exception as err:
        api_error = from_exception(err)
        state.metrics.requests.inc(endpoint=endpoint, status=str(api_error.status))
        return api_error.response()
    service = state.service
    if req.stream:
        try:
            streams = [service.generate_stream(ids, job.sampling, return_logprobs=job.want_logprobs)
                       for ids in job.prompts]
        except Exception as err:  # noqa: BLE001 - e.g. the service closed meanwhile
            api_error = from_exception(err)
            state.metrics.requests.inc(endpoint=endpoint, status=str(api_error.status))
            return api_error.response()
        return SSEResponse(job.events(streams))
    state.metrics.running.inc()
    status, groups = 200, []
    try:
        groups = await _gather([service.agenerate(ids, job.sampling, return_logprobs=job.want_logprobs)
                                for ids in job.prompts])
        return JSONResponse(job.response(groups))
    except asyncio.CancelledError:
        status = 499
        state.metrics.cancelled.inc(endpoint=endpoint)
        raise
    except Exception as err:
        api_error = from_exception(err)
        status = api_error.status
        return api_error.response()
    finally:
        state.metrics.running.inc(-1)
        state.metrics.request_done(endpoint, status, prompt_tokens=sum(len(p) for p in job.prompts),
                                   completion_tokens=sum(len(c.token_ids) for g in groups for c in g),
                                   latency_s=time.perf_counter() - job.start)


async def _gather(coroutines: list[Any]) -> list[Any]:
    """Like asyncio.gather, but the first failure cancels the others (nothing left running)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        body = await request.json()
    except ValueError as err:
        raise bad_request(f"the request body is not valid JSON ({err}); send a JSON object") from err
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise bad_request(_validation_message(err.errors()), _first_param(err.errors())) from err


def _validation_message(errors: Any) -> str:
    parts = []
    for e in list(errors)[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')} (got {e.get('input')!r})"[:300])
    return "invalid request: " + "; ".join(parts)


def _first_param(errors: Any) -> str | None:
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if loc:
            return loc[0]
    return None


async def _refresh_fleet(state: ServerState) -> None:
    """Fleet gauges from the service's status (best effort: a scrape never fails because of it)."""
    if state.service._closed:
        return
    try:
        state.metrics.update_fleet(await asyncio.to_thread(state.service.status, 5.0))
    except Exception as err:
        log.warning("metrics: fleet status unavailable (%s: %s)", type(err).__name__, err)


async def _refresh_loop(state: ServerState) -> None:
    while True:
        await _refresh_fleet(state)
        await asyncio.sleep(_FLEET_REFRESH_S)
