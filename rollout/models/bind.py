"""ModelDef: a model family's module tree for one config, and binding flat parameter dicts to it.

The engine and the trainer keep parameters as a flat `{dotted path: array}` dict, which is the
unit of validation, transfer and swapping. `ModelDef.bind(params)` rebuilds the NNX module from
such a dict; inside `jax.jit` that costs nothing at run time, so the jitted functions take the
parameter leaves as plain arguments and a weight swap never recompiles.

Everything else about the parameters is read once from the family's abstract model (shapes
only, nothing allocated): the spec (paths, shapes, dtypes, and the family's HF name table), and
the logical axes each parameter declares, from which its sharding follows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from rollout.models.config import ModelConfig
from rollout.models.registry import family_for
from rollout.models.sharding import Axes, check_axes, logical_sharding
from rollout.weights.spec import ParamSpec


def _key(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The static half of a model: config, dtype, NNX graph, the ordered parameter spec and
    the logical axes of every parameter."""

    config: ModelConfig
    dtype: jnp.dtype
    model_cls: Any  # the family's NNX model class
    graphdef: Any
    templates: tuple[tuple[tuple[Any, ...], Any], ...]  # (path tuple, abstract nnx.Variable)
    spec: ParamSpec
    axes: Mapping[str, Axes]  # path -> logical axes, one per dimension

    @classmethod
    def create(cls, config: ModelConfig, dtype: Any = jnp.float32) -> ModelDef:
        """Raises ShardingRuleError if a parameter declares no axes or one without a rule, and
        HFNameError if a parameter has no HF name in the family's table."""
        dtype = jnp.dtype(dtype)
        family = family_for(config.architecture).load()
        abstract = nnx.eval_shape(lambda: family.MODEL(config, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        templates = tuple(nnx.to_flat_state(state))
        values = {_key(p): v.get_value() for p, v in templates}
        axes = {
            _key(p): check_axes(_key(p), v.get_metadata().get("axes"), len(v.get_value().shape)) for p, v in templates
        }
        for path in values:
            family.HF_NAMES.to_hf(path)  # every parameter has an HF name
        spec = dataclasses.replace(ParamSpec.of(values), hf=family.HF_NAMES)
        return cls(config, dtype, family.MODEL, graphdef, templates, spec, axes)

    @property
    def paths(self) -> tuple[str, ...]:
        return self.spec.paths

    def shardings(self, mesh: Mesh) -> dict[str, NamedSharding]:
        """path -> the sharding its declared logical axes give on `mesh`."""
        return {path: logical_sharding(self.axes[path], mesh, self.config) for path in self.paths}

    def bind(self, params: Mapping[str, jax.Array]) -> Any:
        """Flat `{path: array}` -> the NNX model holding those arrays (no copies)."""
        state = nnx.from_flat_state([(p, var.replace(params[_key(p)])) for p, var in self.templates])
        return nnx.merge(self.graphdef, state)

    def init_params(self, seed: int = 0) -> dict[str, jax.Array]:
        """Fresh random parameters (HF-style N(0, 0.02) init), e.g. for training from scratch."""
        model = self.model_cls(self.config, dtype=self.dtype, rngs=nnx.Rngs(seed))
        return {_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
