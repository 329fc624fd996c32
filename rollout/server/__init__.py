"""`rollout serve`: an OpenAI-compatible HTTP server on a rollout fleet (needs the `serve` extra).

    server = rollout.serve("Qwen/Qwen3-0.6B", num_workers=2, port=8000, api_key=None)
    # POST {server.url}/v1/chat/completions, /v1/completions (streaming or not), GET /v1/models,
    # POST /v1/weights (sync), GET /v1/status, GET /health, GET /metrics
    server.shutdown()

Modules: handle (serve(), Server), app (routes), state (what the routes share), job (one request:
validate, answer, stream), schema (request bodies), translate (OpenAI <-> rollout, tool_choice,
token-exact continuation), assistant (a chat choice's text -> reasoning, content, tool calls),
tool_calls and reasoning (the parsers), sse (event streams), metrics (Prometheus + Ray), auth
(bind rule, api key), errors (OpenAI error JSON), cli (`rollout serve`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Server", "serve"]


def __getattr__(name: str) -> Any:
    # lazily, so that `rollout --help` (which lists `serve`) needs none of the server libraries
    if name in __all__:
        from rollout.server import handle

        return getattr(handle, name)
    raise AttributeError(f"module 'rollout.server' has no attribute {name!r}")
