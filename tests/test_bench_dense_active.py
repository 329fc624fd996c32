"""The MoE benchmark's dense reference has the MoE model's active parameters (router aside)."""

from __future__ import annotations

import doctest

import numpy as np

from rollout.bench import dense_active
from rollout.bench.dense_active import active_params, dense_active_shape
from rollout.bench.engine import MOE_SHAPE
from rollout.models.bind import ModelDef
from rollout.models.config import ModelConfig


def _params(model_def: ModelDef) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in model_def.spec.leaves)


def test_dense_twin_has_the_moe_shapes_active_parameters_but_the_router():
    moe = ModelDef.create(ModelConfig.from_hf({"architectures": ["Qwen3MoeForCausalLM"], **MOE_SHAPE}))
    dense = ModelDef.create(ModelConfig.from_hf({"architectures": ["Qwen3ForCausalLM"], **dense_active_shape(MOE_SHAPE)}))
    c = moe.config
    routers = len(c.moe_layers) * c.hidden_size * c.num_experts
    assert dense.config.intermediate_size == 4 * 384 and not dense.config.is_moe
    assert _params(dense) == active_params(c, _params(moe)) - routers
    assert 200e6 < _params(moe) < 210e6 and 70e6 < _params(dense) < 76e6  # the docstring's ~205M / ~73M


def test_dense_active_doctests():
    assert doctest.testmod(dense_active).failed == 0
