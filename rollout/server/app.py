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
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rollout.server.auth import check_key
from rollout.server.errors import APIError, bad_request, from_exception
from rollout.server.job import Job
from rollout.server.schema import ChatCompletionRequest, CompletionRequest, WeightsRequest
from rollout.server.sse import SSEResponse
from rollout.server.state import ServerState

log = logging.getLogger("rollout.server")

_FLEET_REFRESH_S = 5.0


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
        except Exception as err:  # noqa: BLE001 - any failure becomes an OpenAI-style error response
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
        job = Job(state, req, endpoint)
    except Exception as err:  # noqa: BLE001 - a bad request becomes an OpenAI-style error response
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
    except Exception as err:  # noqa: BLE001 - any failure becomes an error response or a stream error
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
    if state.service.closed:
        return
    try:
        state.metrics.update_fleet(await asyncio.to_thread(state.service.status, 5.0))
    except Exception as err:  # noqa: BLE001 - metrics must not fail the scrape
        log.warning("metrics: fleet status unavailable (%s: %s)", type(err).__name__, err)


async def _refresh_loop(state: ServerState) -> None:
    while True:
        await _refresh_fleet(state)
        await asyncio.sleep(_FLEET_REFRESH_S)
