"""Model families: Flax NNX decoders and their configs. The KV cache lives outside the model.

`token_logprobs` / `token_logprobs_and_hidden` (rollout.models.logprobs, imported on first use:
they import jax): the trainer-side forward, bit for bit the engine's in batch-invariant mode.
"""

from typing import Any

from rollout.models.config import ModelConfig, UnsupportedConfigError
from rollout.models.registry import supported_architectures

__all__ = ["ModelConfig", "UnsupportedConfigError", "supported_architectures", "token_logprobs",
           "token_logprobs_and_hidden"]


def __getattr__(name: str) -> Any:
    if name in ("token_logprobs", "token_logprobs_and_hidden"):
        from rollout.models import logprobs

        return getattr(logprobs, name)
    raise AttributeError(f"module 'rollout.models' has no attribute {name!r}")
