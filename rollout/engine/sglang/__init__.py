"""The sglang-jax engine backend: an sglang-jax Engine behind rollout's engine boundary.

    from rollout.engine.sglang import create_engine
    engine = create_engine(model, EngineConfig(load_format="dummy"), jax.devices()[:1])

Needs Python >= 3.12 and `pip install -e ".[sglang]"` (see the README: "Choosing the engine
backend"). Modules: requirements (refusals at start), workarounds (sglang-jax 0.0.2 defects),
state (its model state mapped through HF names; the swap), adapter (SglangEngine), compiles.
Importing this package imports neither jax nor sgl_jax.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollout.engine.config import EngineConfig
from rollout.engine.sglang.requirements import HEAD_DIM_MULTIPLE

if TYPE_CHECKING:
    from rollout.engine.sglang.adapter import SglangEngine

NAME = "sglang-jax"  # the value of the `engine` option that selects this backend
# Devices per worker the demo gives this backend unless told otherwise: tensor parallel over
# simulated CPU devices (XLA's in-process all-reduce) hung in sglang-jax 0.0.2's precompile at
# batch 64 on the 2-core dev VM (rendezvous timeout, process aborted); 1 device per worker ran.
DEMO_DEVICES_PER_WORKER = 1

__all__ = ["HEAD_DIM_MULTIPLE", "NAME", "SglangEngine", "check_available", "create_engine"]


def check_available() -> None:
    """Raise BackendUnavailableError (saying how to get it) unless this Python can run the backend:
    >= 3.12, sglang-jax 0.0.2 installed, msgpack >= 1. Cheap (imports neither jax nor sgl_jax); a
    driver calls it before starting workers of the same Python (the demo does)."""
    from rollout.engine.sglang import requirements

    requirements.check_python()
    requirements.installed_version()
    requirements.check_msgpack()


def create_engine(model: str | Path, config: EngineConfig, devices: Sequence[Any] | None = None, **kwargs: Any) -> SglangEngine:
    """The backend's factory: an SglangEngine on `devices` (the worker's share)."""
    from rollout.engine.sglang.adapter import SglangEngine

    return SglangEngine(model, config, devices, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "SglangEngine":
        from rollout.engine.sglang.adapter import SglangEngine

        return SglangEngine
    raise AttributeError(name)
