"""Tensor-parallel sharding over simulated devices: the same logits on 1 and 4 devices, and the
parameters and KV cache split where their axes divide (replicated where they do not).

conftest forces 4 host devices; a mesh over `jax.devices()[:n]` simulates an n-device worker.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rollout.engine.native.runner import ModelRunner
from rollout.models import forward
from rollout.models.bind import ModelDef
from rollout.models.config import ModelConfig
from rollout.models.sharding import (
    TP,
    cache_sharding,
    logical_rules,
    make_mesh,
)
from rollout.testing import make_tiny_checkpoint
from rollout.weights.loader import load_checkpoint

RTOL = 1e-5
MODELS = {
    # every axis divides by 4: heads 4, kv heads 4, mlp 128, vocab 512
    "qwen3-mha-untied": ("Qwen3ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    # kv heads 2 < 4 devices: K/V projections, their biases and the KV cache stay replicated
    "qwen2-gqa2-bias": ("Qwen2ForCausalLM", dict(num_key_value_heads=2)),
}
TOKENS = np.array([[0, 0, 0, 5, 17, 42, 9, 300], [11, 12, 13, 14, 15, 16, 17, 18]], np.int32)
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], np.int32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharding")
    return {name: make_tiny_checkpoint(root / name, arch, seed=7, **kw) for name, (arch, kw) in MODELS.items()}


@dataclasses.dataclass(frozen=True)
class Placed:
    model_def: ModelDef
    mesh: jax.sharding.Mesh
    params: dict[str, jax.Array]


@functools.cache
def placed(path: Path, n_devices: int) -> Placed:
    """The checkpoint loaded onto a mesh of the first n devices with the engine's shardings."""
    cfg = ModelConfig.from_pretrained(path)
    model_def = ModelDef.create(cfg)
    mesh = make_mesh(jax.devices()[:n_devices])
    params = load_checkpoint(
        path,
        model_def.spec,
        lambda p, a: jax.device_put(a, model_def.shardings(mesh)[p]),
    )
    return Placed(model_def, mesh, params)


def full_logits(p: Placed) -> np.ndarray:
    full_logits_fn = jax.jit(lambda params, t, m: forward.forward_full(p.model_def.bind(params), t, m))
    return np.asarray(full_logits_fn(p.params, TOKENS, MASK))[MASK.astype(bool)]


def cached_logits(p: Placed, steps: int = 4) -> np.ndarray:
    """Prefill two prompts into slots 1 and 0 of a sharded cache, then decode `steps` tokens."""
    cfg, model_def = p.model_def.config, p.model_def
    cache = jax.device_put(forward.init_cache(cfg, 2, 32, model_def.dtype), cache_sharding(p.mesh, cfg))
    prompts = np.array([[5, 17, 42, 0], [11, 12, 13, 14]], np.int32)
    lengths = np.array([3, 4], np.int32)
    slots = np.array([1, 0], np.int32)
    prefill = jax.jit(lambda params, c, t, n, d, s: forward.prefill(model_def.bind(params), c, t, n, d, s))
    decode = jax.jit(lambda params, c, s, t, pos: forward.decode(model_def.bind(params), c, s, t, pos, 32))
    logits, cache = prefill(p.params, cache, prompts, lengths, slots, np.arange(2, dtype=np.int32))
    out = [np.asarray(logits)]
    for k in range(steps):
        fed = np.array([100 + k, 200 + k], np.int32)
        logits, cache = decode(p.params, cache, slots, fed, lengths + k)
        out.append(np.asarray(logits))
    return np.stack(out)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", MODELS)
def test_full_forward_logits_are_the_same_on_1_and_4_devices(checkpoints, name):
    err = rel_err(full_logits(placed(checkpoints[name], 4)), full_logits(placed(checkpoints[name], 1)))
    print(f"\n{name} full forward 4 vs 1 devices rel err {err:.2e}")
    assert err <= RTOL


@pytest.mark.parametrize("name", MODELS)
def test_cached_prefill_and_decode_logits_are_the_same_on_1_and_4_devices(checkpoints, name):
    err = rel_err(cached_logits(placed(checkpoints[name], 4)), cached_logits(placed(checkpoints[name], 1)))
    print(f"\n{name} cached decode 4 vs 1 devices rel err {err:.2e}")
    assert err <= RTOL


def runner_on(path: Path, n_devices: int) -> ModelRunner:
    cfg = ModelConfig.from_pretrained(path)
    mesh = make_mesh(jax.devices()[:n_devices])
    return ModelRunner(ModelDef.create(cfg), mesh, max_batch=2, max_seq_len=16, decode_steps=1)


def padded(spec: P, ndim: int) -> tuple[str | None, ...]:
    """A spec as one entry per array axis: P('tp') on a 2-D array means P('tp', None)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def shard_shape(array: jax.Array) -> tuple[int, ...]:
    shapes = {tuple(s.data.shape) for s in array.addressable_shards}
    assert len(shapes) == 1, shapes
    return shapes.pop()


def test_params_are_split_column_row_and_vocab_parallel_on_4_devices(checkpoints):
    path = checkpoints["qwen3-mha-untied"]
    runner = runner_on(path, 4)
    params = placed(path, 4).params
    expected = {
        "embed_tokens": P(TP, None),  # (vocab, hidden): vocab-parallel
        "lm_head.kernel": P(None, TP),  # (hidden, vocab)
        "layers.0.self_attn.q_proj.kernel": P(None, TP),  # column-parallel
        "layers.0.self_attn.k_proj.kernel": P(None, TP),
        "layers.0.self_attn.v_proj.kernel": P(None, TP),
        "layers.0.self_attn.o_proj.kernel": P(TP, None),  # row-parallel
        "layers.1.mlp.gate_proj.kernel": P(None, TP),
        "layers.1.mlp.up_proj.kernel": P(None, TP),
        "layers.1.mlp.down_proj.kernel": P(TP, None),
    }
    for name, spec in expected.items():
        array = params[name]
        assert padded(runner.param_shardings[name].spec, array.ndim) == tuple(spec), name
        split = tuple(d // 4 if axis == TP else d for d, axis in zip(array.shape, spec))
        assert shard_shape(array) == split, name
    for name in ("norm.weight", "layers.0.input_layernorm.weight", "layers.0.self_attn.q_norm.weight"):
        assert params[name].sharding.is_fully_replicated, name


def test_kv_cache_is_split_by_kv_heads_when_they_divide(checkpoints):
    runner = runner_on(checkpoints["qwen3-mha-untied"], 4)
    k, v = runner.cache[0]
    assert padded(k.sharding.spec, k.ndim) == (None, TP, None, None)  # (slots, kv_heads, seq, head_dim)
    assert shard_shape(k) == (2, 1, 16, 32) and shard_shape(v) == (2, 1, 16, 32)


def test_kv_head_params_and_cache_are_replicated_when_devices_outnumber_kv_heads(checkpoints):
    path = checkpoints["qwen2-gqa2-bias"]
    runner = runner_on(path, 4)
    params = placed(path, 4).params
    for name in (
        "layers.0.self_attn.k_proj.kernel",
        "layers.0.self_attn.v_proj.kernel",
        "layers.0.self_attn.k_proj.bias",
        "layers.0.self_attn.v_proj.bias",
    ):
        assert params[name].sharding.is_fully_replicated, name
        assert runner.param_shardings[name].is_fully_replicated, name
    # the query side still splits over all 4 devices
    assert shard_shape(params["layers.0.self_attn.q_proj.kernel"]) == (64, 64 // 4)
    assert shard_shape(params["layers.0.self_attn.q_proj.bias"]) == (64 // 4,)
    for k, v in runner.cache:
        assert k.sharding.is_fully_replicated and v.sharding.is_fully_replicated


def test_kv_heads_split_on_a_mesh_they_divide():
    """2 KV heads are replicated on 4 devices but split on 2."""
    cfg = _config(num_kv_heads=2)
    mesh = make_mesh(jax.devices()[:2])
    assert ModelDef.create(cfg).shardings(mesh)["layers.0.self_attn.k_proj.kernel"].spec == P(None, TP)
    assert padded(cache_sharding(mesh, cfg).spec, 4) == (None, TP, None, None)


def test_axes_that_do_not_divide_the_device_count_are_replicated():
    cfg = _config(vocab_size=450, intermediate_size=130)  # neither divides by 4
    rules = logical_rules(cfg, 4)
    assert rules["vocab"] is None and rules["mlp"] is None
    assert rules["q_heads"] == TP
    mesh = make_mesh(jax.devices()[:4])
    shardings = ModelDef.create(cfg).shardings(mesh)
    assert shardings["embed_tokens"].is_fully_replicated
    assert shardings["layers.0.mlp.down_proj.kernel"].is_fully_replicated


def test_one_device_replicates_everything():
    cfg = _config()
    assert set(logical_rules(cfg, 1).values()) == {None}


def _config(**changes) -> ModelConfig:
    base = ModelConfig(
        architecture="Qwen3ForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=32,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        qk_norm=True,
        qkv_bias=False,
    )
    return dataclasses.replace(base, **changes)


def register_family(monkeypatch, architecture: str, model_cls) -> ModelConfig:
    """A config of `architecture`, registered for this test as a family whose model is `model_cls`."""
    import sys
    import types

    from rollout.models import qwen, registry

    family = types.ModuleType(f"{architecture}_family")
    family.MODEL, family.HF_NAMES = model_cls, qwen.HF_NAMES
    monkeypatch.setitem(sys.modules, family.__name__, family)
    monkeypatch.setitem(registry._FAMILIES, architecture, registry.Family("test", family.__name__, True, False))
    return _config(architecture=architecture)


def test_a_parameter_whose_axes_have_no_sharding_rule_is_refused_at_startup_naming_it(monkeypatch):
    """A new family's parameter on an axis the rules do not know fails when the model is built."""
    from flax import nnx

    from rollout.models import qwen
    from rollout.models.sharding import ShardingRuleError

    class WithExperts(qwen.QwenForCausalLM):
        def __init__(self, cfg, *, dtype, rngs):
            super().__init__(cfg, dtype=dtype, rngs=rngs)
            self.router = nnx.Param(jax.numpy.zeros((cfg.hidden_size, 8), dtype), axes=("embed", "experts"))

    cfg = register_family(monkeypatch, "ExpertsForCausalLM", WithExperts)
    with pytest.raises(ShardingRuleError, match=r"'router' has logical axes \('embed', 'experts'\).*'experts'"):
        ModelDef.create(cfg)


def test_a_parameter_without_declared_axes_is_refused_at_startup_naming_it(monkeypatch):
    from flax import nnx

    from rollout.models import qwen
    from rollout.models.sharding import ShardingRuleError

    class WithBareParam(qwen.QwenForCausalLM):
        def __init__(self, cfg, *, dtype, rngs):
            super().__init__(cfg, dtype=dtype, rngs=rngs)
            self.scale = nnx.Param(jax.numpy.ones((cfg.hidden_size,), dtype))

    cfg = register_family(monkeypatch, "BareForCausalLM", WithBareParam)
    with pytest.raises(ShardingRuleError, match="'scale' declares no logical axes"):
        ModelDef.create(cfg)


def test_a_parameter_without_an_hf_name_is_refused_at_startup_naming_it(monkeypatch):
    from flax import nnx

    from rollout.models import qwen
    from rollout.weights.hf_names import HFNameError

    class WithUnnamedParam(qwen.QwenForCausalLM):
        def __init__(self, cfg, *, dtype, rngs):
            super().__init__(cfg, dtype=dtype, rngs=rngs)
            self.scale = nnx.Param(jax.numpy.ones((cfg.hidden_size,), dtype), axes=("embed",))

    cfg = register_family(monkeypatch, "UnnamedForCausalLM", WithUnnamedParam)
    with pytest.raises(HFNameError, match="'scale' has no HF name"):
        ModelDef.create(cfg)
