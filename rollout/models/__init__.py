"""Model families: Flax NNX decoders and their configs. The KV cache lives outside the model."""

from rollout.models.config import ModelConfig, UnsupportedConfigError
from rollout.models.registry import supported_architectures

__all__ = ["ModelConfig", "UnsupportedConfigError", "supported_architectures"]
