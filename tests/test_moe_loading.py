"""Qwen3-MoE weights: both HF forms (per-expert tensors as save_pretrained writes them, fused
`gate_up_proj` as transformers 5 holds them in memory), sharded files, and strict validation:
a missing expert, a wrong expert count or a router of the wrong shape is refused by name and
the serving version keeps serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.models import ModelConfig
from rollout.models.bind import ModelDef
from rollout.weights.loader import checkpoint_spec, load_checkpoint
from rollout.weights.spec import SpecMismatchError, flatten_params

from moe_reference import make_moe_checkpoint

torch = pytest.importorskip("torch")

MOE = dict(num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
EXPERT = "model.layers.0.mlp.experts"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_moe_checkpoint(tmp_path_factory.mktemp("moe") / "one", seed=1, **MOE)


@pytest.fixture(scope="module")
def model_def(checkpoint) -> ModelDef:
    return ModelDef.create(ModelConfig.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def on_disk(checkpoint, model_def) -> dict[str, np.ndarray]:
    return load_checkpoint(checkpoint, model_def.spec, lambda path, array: np.asarray(array))


@pytest.fixture(scope="module")
def per_expert(checkpoint) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(checkpoint / "model.safetensors"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    with Engine(checkpoint, EngineConfig(max_batch=2, max_seq_len=32, decode_steps=2)) as engine:
        yield engine


def test_checkpoint_has_per_expert_tensors_and_mixes_dense_and_moe_layers(per_expert, model_def):
    assert f"{EXPERT}.3.gate_proj.weight" in per_expert
    assert "model.layers.1.mlp.gate_proj.weight" in per_expert  # mlp_only_layers=[1]
    assert model_def.spec.by_path()["layers.0.mlp.experts.gate_proj"].shape == (4, 64, 32)


def test_transformers_fused_state_dict_maps_to_the_same_leaves_as_the_checkpoint(checkpoint, model_def, on_disk):
    import transformers

    state = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    assert f"{EXPERT}.gate_up_proj" in state  # transformers 5's fused in-memory form
    flat = flatten_params({k: v.numpy() for k, v in state.items()}, model_def.spec)
    assert sorted(flat) == sorted(on_disk)
    for path, array in on_disk.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), array, err_msg=path)


def test_sharded_checkpoint_loads_the_same_leaves(tmp_path, model_def, on_disk):
    sharded = make_moe_checkpoint(tmp_path / "sharded", seed=1, max_shard_size="60KB", **MOE)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    model_def.spec.check(checkpoint_spec(sharded, model_def.spec))
    loaded = load_checkpoint(sharded, model_def.spec, lambda path, array: np.asarray(array))
    for path, array in on_disk.items():
        np.testing.assert_array_equal(loaded[path], array, err_msg=path)


def test_per_expert_tree_stages_on_the_engine(engine, per_expert):
    engine.stage(engine.version + 1, per_expert)
    engine.abort()


def test_missing_expert_is_refused_naming_the_tensor(model_def, per_expert):
    tree = {k: v for k, v in per_expert.items() if k != f"{EXPERT}.2.up_proj.weight"}
    with pytest.raises(SpecMismatchError, match=rf"{EXPERT}\.2\.up_proj\.weight"):
        flatten_params(tree, model_def.spec)


def test_expert_beyond_the_configured_count_is_refused_naming_the_tensor(model_def, per_expert):
    tree = {**per_expert, f"{EXPERT}.4.down_proj.weight": per_expert[f"{EXPERT}.0.down_proj.weight"]}
    with pytest.raises(SpecMismatchError, match=rf"{EXPERT}\.4\.down_proj\.weight.*4 experts"):
        flatten_params(tree, model_def.spec)


def test_fused_experts_of_the_wrong_count_are_refused_naming_the_leaf(model_def, on_disk):
    tree = dict(on_disk, **{"layers.0.mlp.experts.up_proj": on_disk["layers.0.mlp.experts.up_proj"][:3]})
    with pytest.raises(SpecMismatchError, match=r"layers\.0\.mlp\.experts\.up_proj: expected shape \(4, 64, 32\)"):
        model_def.spec.check(model_def.spec.of(tree))


def test_router_of_the_wrong_shape_is_refused_and_the_old_version_keeps_serving(engine, per_expert):
    prompt = [[5, 6, 7]]
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    before = engine.generate(prompt, greedy, timeout=120)[0].token_ids
    version = engine.version
    bad = {**per_expert, "model.layers.0.mlp.gate.weight": np.zeros((3, 64), np.float32)}
    with pytest.raises(SpecMismatchError, match=r"layers\.0\.mlp\.gate\.kernel: expected shape \(64, 4\), got \(64, 3\)"):
        engine.stage(version + 1, bad)
    assert engine.version == version and engine.staged_version is None
    assert engine.generate(prompt, greedy, timeout=120)[0].token_ids == before


def test_a_nan_in_one_expert_is_refused_naming_it_and_the_old_version_keeps_serving(engine, per_expert):
    from rollout.weights.finite import NonFiniteWeightsError

    prompt = [[5, 6, 7]]
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    before = engine.generate(prompt, greedy, timeout=120)[0].token_ids
    version = engine.version
    name = f"{EXPERT}.2.down_proj.weight"
    poisoned = per_expert[name].copy()
    poisoned[0, 0] = np.nan
    with pytest.raises(NonFiniteWeightsError, match=r"down_proj"):
        engine.stage(version + 1, {**per_expert, name: poisoned})
    assert engine.version == version and engine.staged_version is None
    assert engine.generate(prompt, greedy, timeout=120)[0].token_ids == before


def test_sglang_backend_refuses_moe_before_start(checkpoint):
    from rollout.engine.sglang import requirements

    with pytest.raises(ValueError, match=r"mixture-of-experts.*engine='native'"):
        requirements.check_architecture(ModelConfig.from_pretrained(checkpoint))


def test_routed_experts_are_refused_on_a_dense_model(tiny_qwen3):
    from rollout.engine.config import EngineConfig as Config
    from rollout.prompts import PromptValidator
    from rollout.tokenizer import Tokenizer

    validator = PromptValidator(ModelConfig.from_pretrained(tiny_qwen3), Tokenizer.from_pretrained(tiny_qwen3), Config())
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        validator.validate([1, 2, 3], SamplingParams(return_routed_experts=True))


def test_replayed_routes_of_the_wrong_shape_are_refused(engine):
    with pytest.raises(ValueError, match=r"routed_experts\[0\] has shape \(2, 1, 2\)"):
        engine.score([[5, 6, 7]], [[8, 9]], routed_experts=[np.zeros((2, 1, 2), np.int16)])
