"""ServerState: what the routes (rollout.server.app) and each request (rollout.server.job) share.

The service, the name it is served under, the api key, the output parsers (reasoning, tool
calls), the metrics, and the two checks every
route makes: the server is open, and the request names the model served here.
"""

from __future__ import annotations

import time
from typing import Any

from rollout.server import translate
from rollout.server.errors import APIError
from rollout.server.metrics import ServerMetrics

# `<think>...</think>` -> reasoning_content (Qwen3, DeepSeek-R1 style); off by default, as in vLLM/sglang
REASONING_PARSERS = (None, "qwen3")
# `<tool_call>{json}</tool_call>` -> tool_calls (Qwen2.5/Qwen3, Hermes style); on for requests with tools
TOOL_CALL_PARSERS = (None, "hermes")


class ServerState:
    """What the routes share: the service, the served name, the key, the metrics."""

    def __init__(self, service: Any, model_name: str, api_key: str | None, *,
                 reasoning_parser: str | None = None, tool_call_parser: str | None = "hermes"):
        if reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser={reasoning_parser!r} is unknown; expected one of "
                             f"{sorted(p for p in REASONING_PARSERS if p)} or None (off)")
        if tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser={tool_call_parser!r} is unknown; expected one of "
                             f"{sorted(p for p in TOOL_CALL_PARSERS if p)} or None (calls stay text)")
        self.reasoning_parser = reasoning_parser
        self.tool_call_parser = tool_call_parser
        self.service = service
        self.model_name = model_name
        self.api_key = api_key
        self.metrics = ServerMetrics()
        self.texts = translate.TokenTexts(service.tokenizer)
        self.max_seq_len = service.engine_config.max_seq_len
        self.closing = False
        self.created = int(time.time())

    def check_open(self) -> None:
        if self.closing or self.service.closed:
            raise APIError(503, "the server is shutting down (its rollout service is closed); retry against "
                           "a running server", type="service_unavailable", code="service_unavailable")

    def check_model(self, name: str) -> None:
        if name not in (self.model_name, str(self.service.checkpoint)):
            raise APIError(404, f"model {name!r} does not exist here: this server serves {self.model_name!r} "
                           "(GET /v1/models lists it)", param="model", code="model_not_found")
