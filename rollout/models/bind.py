"""Binding flat parameter dicts to the NNX module tree.

The engine and the trainer keep parameters as a flat `{dotted path: array}` dict, which is the
unit of validation, transfer and swapping. `ModelDef.bind(params)` rebuilds the NNX module from
such a dict; inside `jax.jit` that costs nothing at run time, so the jitted functions take the
parameter leaves as plain arguments and a weight swap never recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rollout.models.config import ModelConfig
from rollout.models.qwen import QwenForCausalLM
from rollout.weights.spec import ParamSpec


def _key(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The static half of a model: config, dtype, NNX graph and the ordered parameter spec."""

    config: ModelConfig
    dtype: jnp.dtype
    graphdef: Any
    templates: tuple[tuple[tuple[Any, ...], Any], ...]  # (path tuple, abstract nnx.Variable)
    spec: ParamSpec

    @classmethod
    def create(cls, config: ModelConfig, dtype: Any = jnp.float32) -> "ModelDef":
        dtype = jnp.dtype(dtype)
        abstract = nnx.eval_shape(lambda: QwenForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        templates = tuple(nnx.to_flat_state(state))
        spec = ParamSpec.of({_key(p): v.get_value() for p, v in templates})
        return cls(config, dtype, graphdef, templates, spec)

    @property
    def paths(self) -> tuple[str, ...]:
        return self.spec.paths

    def bind(self, params: Mapping[str, jax.Array]) -> QwenForCausalLM:
        """Flat `{path: array}` -> the NNX model holding those arrays (no copies)."""
        state = nnx.from_flat_state([(p, var.replace(params[_key(p)])) for p, var in self.templates])
        return nnx.merge(self.graphdef, state)

    def init_params(self, seed: int = 0) -> dict[str, jax.Array]:
        """Fresh random parameters (HF-style N(0, 0.02) init), e.g. for training from scratch."""
        model = QwenForCausalLM(self.config, dtype=self.dtype, rngs=nnx.Rngs(seed))
        return {_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
