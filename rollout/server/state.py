"""ServerState: what the routes (rollout.server.app) and each request (rollout.server.job) share.

The service, the name it is served under, the api key, the metrics, and the two checks every
route makes: the server is open, and the request names the model served here.
"""

from __future__ import annotations

import time
from typing import Any

from rollout.server import translate
from rollout.server.errors import APIError
from rollout.server.metrics import ServerMetrics


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
        if self.closing or self.service.closed:
            raise APIError(503, "the server is shutting down (its rollout service is closed); retry against "
                           "a running server", type="service_unavailable", code="service_unavailable")

    def check_model(self, name: str) -> None:
        if name not in (self.model_name, str(self.service.checkpoint)):
            raise APIError(404, f"model {name!r} does not exist here: this server serves {self.model_name!r} "
                           "(GET /v1/models lists it)", param="model", code="model_not_found")
