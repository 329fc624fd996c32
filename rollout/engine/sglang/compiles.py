"""A process-wide count of XLA compilations, from jax's monitoring events.

sglang-jax compiles through several jitted functions (the model, the sampler, and small helpers
of its batch preparation); counting every backend compile in the process is the honest measure
that a weight swap compiled nothing new.
"""

from __future__ import annotations

import threading

_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    _instance: CompileCounter | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.count = 0

    def _on_event(self, event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == _EVENT:
            self.count += 1

    @classmethod
    def install(cls) -> CompileCounter:
        """The process's counter (registered with jax once)."""
        with cls._guard:
            if cls._instance is None:
                import jax

                counter = cls()
                jax.monitoring.register_event_duration_secs_listener(counter._on_event)
                cls._instance = counter
            return cls._instance
