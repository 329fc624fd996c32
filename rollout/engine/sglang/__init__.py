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

if TYPE_CHECKING:
    from rollout.engine.sglang.adapter import SglangEngine

NAME = "sglang-jax"  # the value of the `engine` option that selects this backend

__all__ = ["NAME", "SglangEngine", "create_engine"]


def create_engine(model: str | Path, config: EngineConfig, devices: Sequence[Any] | None = None, **kwargs: Any) -> SglangEngine:
    """The backend's factory: an SglangEngine on `devices` (the worker's share)."""
    from rollout.engine.sglang.adapter import SglangEngine

    return SglangEngine(model, config, devices, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "SglangEngine":
        from rollout.engine.sglang.adapter import SglangEngine

        return SglangEngine
    raise AttributeError(name)
