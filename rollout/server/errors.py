"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with a status.

Every failure a client can cause maps to a 4xx with a message saying what was expected and what
came; failures of the fleet map to 503/504; anything else is a 500 whose body names the error
type only (the stack trace goes to the server log, never to the client).
"""

from __future__ import annotations

import logging
from typing import Any

from rollout.errors import ServiceClosedError, SyncError, WorkerUnavailableError
from rollout.weights.finite import NonFiniteWeightsError
from rollout.weights.spec import SpecMismatchError

log = logging.getLogger("rollout.server")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error type."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Any:
        from fastapi.responses import JSONResponse  # lazily: `rollout --help` works without the extra

        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_exception(err: BaseException) -> APIError:
    """The APIError for an exception raised while serving a request."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, (SpecMismatchError, NonFiniteWeightsError, ValueError, TypeError, FileNotFoundError)):
        return APIError(400, str(err))
    if isinstance(err, (ServiceClosedError, WorkerUnavailableError)):
        return APIError(503, str(err), type="service_unavailable", code="service_unavailable")
    if isinstance(err, SyncError):
        return APIError(500, str(err), type="sync_error", code="sync_failed")
    if isinstance(err, TimeoutError):
        return APIError(504, f"timed out: {err}", type="timeout", code="timeout")
    log.error("internal error while serving a request", exc_info=err)
    return APIError(500, f"internal server error ({type(err).__name__}); see the server log",
                    type="internal_error", code="internal_error")
