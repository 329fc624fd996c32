"""The serving engine. Importing this package does not import jax; `Engine` loads it lazily."""

from rollout.engine.config import EngineConfig
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion, EngineClosedError, WeightSyncError

__all__ = ["Completion", "Engine", "EngineClosedError", "EngineConfig", "SamplingParams", "WeightSyncError"]


def __getattr__(name: str):
    if name == "Engine":
        from rollout.engine.native.engine import Engine

        return Engine
    raise AttributeError(name)
