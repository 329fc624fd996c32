"""`rollout.serve(...)`: the fleet and its HTTP server in this process, without blocking.

    server = rollout.serve("Qwen/Qwen3-0.6B", num_workers=2, port=8000)   # or serve(service)
    server.url                      # "http://127.0.0.1:8000"
    server.service.sync_weights(params)   # the trainer keeps syncing; completions carry versions
    server.shutdown()

uvicorn runs in a daemon thread with its own event loop; Ray object refs are awaited on that
loop, so the trainer's thread (and its event loop, if any) is never blocked by requests.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Self

from rollout.server.auth import check_bind


class Server:
    """A running HTTP server on a RolloutService. Use `serve()` to make one."""

    def __init__(self, service: Any, *, owns_service: bool, host: str, port: int, api_key: str | None,
                 model_name: str, log_level: str = "warning", start_timeout_s: float = 60.0,
                 reasoning_parser: str | None = None, tool_call_parser: str | None = "hermes"):
        import uvicorn

        from rollout.server.app import build_app
        from rollout.server.state import ServerState

        check_bind(host, api_key)
        self.service = service
        self._owns_service = owns_service
        self.state = ServerState(service, model_name, api_key, reasoning_parser=reasoning_parser,
                                 tool_call_parser=tool_call_parser)
        self.app = build_app(self.state)
        config = uvicorn.Config(self.app, host=host, port=port, log_level=log_level, access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rollout-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._uvicorn.should_exit = True
                raise RuntimeError(
                    f"the HTTP server did not start on {host}:{port} ({self._error!r}); is the port in use? "
                    "Pick another --port (0 = any free port)"
                )
            time.sleep(0.02)
        sockname = self._uvicorn.servers[0].sockets[0].getsockname()
        self.host, self.port = host, int(sockname[1])

    def _run(self) -> None:
        try:
            self._uvicorn.run()
        except BaseException as err:  # noqa: BLE001 - uvicorn exits with SystemExit on bind errors
            self._error = err

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def metrics(self) -> Any:
        return self.state.metrics

    def shutdown(self) -> None:
        """Refuse new requests (503), stop the HTTP server (open streams are cancelled), and shut
        the fleet down if `serve` started it. Idempotent."""
        self.state.closing = True
        self._uvicorn.should_exit = True
        self._thread.join(timeout=30)
        if self._owns_service:
            self.service.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"Server({self.url}, model={self.state.model_name!r})"


def serve(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    log_level: str = "warning",
    reasoning_parser: str | None = None,
    tool_call_parser: str | None = "hermes",
    **options: Any,
) -> Server:
    """Start a fleet (or use the RolloutService given as `model`) and an OpenAI-compatible HTTP
    server on it; returns at once with the running Server (`url`, `service`, `shutdown()`).

    `options` are RolloutService's (num_workers, devices_per_worker, max_batch, ...). Binding an
    address other than loopback requires `api_key`. `served_model_name` is the name clients
    send as `model` (default: the model argument as given). `reasoning_parser="qwen3"` returns
    `<think>...</think>` as the message's `reasoning_content`; `tool_call_parser="hermes"` (the
    default) returns `<tool_call>` blocks as `tool_calls` for chat requests with tools (None:
    calls stay text).
    """
    from rollout.coordinator.service import RolloutService

    api_key = api_key or None
    check_bind(host, api_key)  # before starting a fleet
    if isinstance(model, RolloutService):
        if options:
            raise TypeError(f"fleet options {sorted(options)} were given with a running RolloutService; "
                            "pass either a model (and options) or a service")
        service, owns = model, False
        name = served_model_name or str(service.checkpoint)
    else:
        name = served_model_name or os.fspath(model)
        service, owns = RolloutService(model, **options), True
    try:
        return Server(service, owns_service=owns, host=host, port=port, api_key=api_key, model_name=name,
                      log_level=log_level, reasoning_parser=reasoning_parser, tool_call_parser=tool_call_parser)
    except BaseException:
        if owns:
            service.shutdown()
        raise
