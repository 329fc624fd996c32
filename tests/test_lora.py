"""LoRA adapters on the native engine: PEFT's forms parsed and refused like any update, served
merged from the resident base, equal to PEFT's merged transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lora_reference import TARGETS, peft_model, save_adapter

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.weights.buckets import Manifest, pack, plan_buckets
from rollout.weights.lora import (
    LoraAdapter,
    LoraAdapterError,
    LoraConfig,
    LoraFactors,
    adapter_factors,
    check_factors,
    factors_spec,
)

PROMPT = [7, 8, 9, 10, 11, 12]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(max_batch=4, max_seq_len=128, decode_steps=4)) as eng:
        yield eng


@pytest.fixture(scope="module")
def adapter_dir(tiny_qwen3, tmp_path_factory) -> Path:
    return save_adapter(peft_model(tiny_qwen3, seed=3), tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture(scope="module")
def adapter(adapter_dir) -> LoraAdapter:
    return LoraAdapter.from_peft_dir(adapter_dir)


def _sync(engine: Engine, adapter, *, full: bool = False) -> int:
    version = engine.version + 1
    (engine.stage if full else engine.stage_adapter)(version, adapter)
    engine.commit(version, wait=True)
    return version


def _logits(engine: Engine, ids: list[int]) -> np.ndarray:
    import jax

    from rollout.models import forward

    params = engine.weights_snapshot()[1]
    seq = np.array([ids])
    fn = jax.jit(lambda p, t, m: forward.forward_full(engine.model_def.bind(p), t, m))
    return np.asarray(fn(params, seq, np.ones_like(seq)))[0]


def _bits(params: dict) -> dict[str, bytes]:
    return {path: np.asarray(array).tobytes() for path, array in params.items()}


# -- parsing and validation ----------------------------------------------------------------------


def test_peft_directory_parses_to_one_factor_pair_per_targeted_linear(engine, adapter):
    factors = adapter.factors(engine.spec)
    layers = engine.model_config.num_layers
    assert len(factors) == 2 * len(TARGETS) * layers
    a = factors["layers.0.self_attn.q_proj.kernel:lora_A"]
    b = factors["layers.0.self_attn.q_proj.kernel:lora_B"]
    d_in, d_out = engine.spec.by_path()["layers.0.self_attn.q_proj.kernel"].shape
    assert a.shape == (4, d_in) and b.shape == (d_out, 4)
    assert adapter.config == LoraConfig(rank=4, alpha=8.0, target_modules=tuple(sorted(TARGETS)))


def test_live_peft_state_dict_names_with_the_adapter_name_are_accepted(engine, tiny_qwen3):
    wrapped = peft_model(tiny_qwen3, seed=4)
    tensors = {k: v.numpy() for k, v in wrapped.state_dict().items() if "lora_" in k}
    assert any(".default." in k for k in tensors)
    config = wrapped.peft_config["default"].to_dict()
    factors = LoraAdapter.from_peft(tensors, config).factors(engine.spec)
    assert len(factors) == len(tensors)


def _with(tensors: dict, name_part: str, change) -> dict:
    out = dict(tensors)
    name = next(k for k in tensors if name_part in k)
    changed = change(tensors[name])
    if changed is None:
        del out[name]
    else:
        out[name] = changed
    return out


BAD_ADAPTERS = {
    "A not (r, in)": lambda t, c: (_with(t, "layers.0.self_attn.q_proj.lora_A", lambda a: a[:, :-1]), c),
    "B not (out, r)": lambda t, c: (_with(t, "layers.0.mlp.down_proj.lora_B", lambda b: b.T.copy()), c),
    "another rank in one module": lambda t, c: (
        _with(_with(t, "layers.1.mlp.up_proj.lora_A", lambda a: a[:2]), "layers.1.mlp.up_proj.lora_B",
              lambda b: b[:, :2]), c),
    "B missing": lambda t, c: (_with(t, "layers.0.self_attn.v_proj.lora_B", lambda b: None), c),
    "NaN": lambda t, c: (_with(t, "layers.1.self_attn.o_proj.lora_B", lambda b: np.where(b == b.flat[3], np.nan, b)), c),
    "Inf": lambda t, c: (_with(t, "layers.0.self_attn.k_proj.lora_A", lambda a: np.full_like(a, np.inf)), c),
    "integer factors": lambda t, c: (_with(t, "layers.0.mlp.gate_proj.lora_A", lambda a: a.astype(np.int32)), c),
    "unknown module": lambda t, c: (
        {**t, "base_model.model.model.layers.0.mlp.nope_proj.lora_A.weight": next(iter(t.values()))}, c),
    "layer past the last": lambda t, c: (
        {k.replace("layers.1.", "layers.9."): v for k, v in t.items()}, c),
    "target module absent from the base": lambda t, c: (t, {**c, "target_modules": [*TARGETS, "w1"]}),
    "module not in target_modules": lambda t, c: (t, {**c, "target_modules": ["q_proj"]}),
    "DoRA": lambda t, c: (t, {**c, "use_dora": True}),
    "rank pattern": lambda t, c: (t, {**c, "rank_pattern": {"q_proj": 8}}),
    "modules_to_save": lambda t, c: (t, {**c, "modules_to_save": ["lm_head"]}),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_refused_and_the_served_adapter_keeps_serving(engine, adapter, adapter_dir, case):
    _sync(engine, adapter)
    before = engine.generate([PROMPT], GREEDY)[0]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors, config = BAD_ADAPTERS[case](dict(adapter.tensors), config)
    with pytest.raises(LoraAdapterError):
        engine.stage_adapter(engine.version + 1, LoraAdapter.from_peft(tensors, config))
    assert engine.staged_version is None
    after = engine.generate([PROMPT], GREEDY)[0]
    assert after.weight_version == before.weight_version
    assert list(after.token_ids) == list(before.token_ids)


def test_adapter_tensors_in_hf_layout_are_refused_with_the_expected_shapes_named(engine, adapter):
    tensors = {k: (v.T.copy() if "lora_A" in k else v) for k, v in adapter.tensors.items()}
    with pytest.raises(LoraAdapterError, match=r"lora_A expected shape \(4, \d+\)"):
        LoraAdapter.from_peft(tensors, adapter.config).factors(engine.spec)


# -- merged serving ------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_served_adapter_equals_peft_merged_model(engine, tiny_qwen3, tmp_path, rslora):
    import torch

    wrapped = peft_model(tiny_qwen3, seed=5, rank=8, alpha=16.0, rslora=rslora)
    version = _sync(engine, LoraAdapter.from_peft_dir(save_adapter(wrapped, tmp_path / "a")))
    merged = wrapped.merge_and_unload().eval()
    ids = [*PROMPT, 20, 21, 22, 23]
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_logits(engine, ids), want, atol=1e-4, rtol=0)

    out = engine.generate([PROMPT], GREEDY)[0]
    assert out.weight_version == version
    with torch.no_grad():
        tokens = merged.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                                 do_sample=False, max_new_tokens=16, min_new_tokens=16, eos_token_id=None,
                                 pad_token_id=0)[0, len(PROMPT):].tolist()
    assert list(out.token_ids) == tokens
    # the logprobs the engine reports are those of the merged model
    log_probs = torch.log_softmax(merged(torch.tensor([PROMPT + list(out.token_ids)])).logits[0], -1).detach().numpy()
    want_lp = [log_probs[len(PROMPT) - 1 + i, t] for i, t in enumerate(out.token_ids)]
    np.testing.assert_allclose(np.asarray(out.logprobs), want_lp, atol=1e-4, rtol=0)


def test_zero_adapter_after_several_adapters_serves_the_base_bit_for_bit(engine, tiny_qwen3, adapter, tmp_path):
    from rollout.weights.loader import iter_tensors

    _sync(engine, dict(iter_tensors(tiny_qwen3)), full=True)  # the base, whatever ran before
    base = _bits(engine.current_params())
    for seed in (6, 7, 8):
        _sync(engine, LoraAdapter.from_peft_dir(save_adapter(peft_model(tiny_qwen3, seed=seed), tmp_path / str(seed))))
        assert _bits(engine.current_params()) != base
    zero = LoraAdapter.from_peft({k: np.zeros_like(v) for k, v in adapter.tensors.items()}, adapter.config)
    _sync(engine, zero)
    assert _bits(engine.current_params()) == base


def test_adapter_merges_onto_the_base_not_onto_the_served_adapter(engine, tiny_qwen3, adapter):
    from rollout.weights.loader import iter_tensors

    _sync(engine, dict(iter_tensors(tiny_qwen3)), full=True)
    _sync(engine, adapter)
    once = _bits(engine.current_params())
    _sync(engine, adapter)  # the same adapter again: the same weights, not the delta twice
    assert _bits(engine.current_params()) == once


def test_full_update_replaces_the_base_and_drops_the_adapter(engine, tiny_qwen3_perturbed, adapter):
    from rollout.weights.loader import iter_tensors

    _sync(engine, adapter)
    version = _sync(engine, dict(iter_tensors(tiny_qwen3_perturbed)), full=True)
    assert engine.base_version == version
    served = _bits(engine.current_params())
    zero = LoraAdapter.from_peft({k: np.zeros_like(v) for k, v in adapter.tensors.items()}, adapter.config)
    _sync(engine, zero)  # a zero adapter on the new base: exactly the full update
    assert _bits(engine.current_params()) == served


def test_aborted_adapter_leaves_the_served_weights(engine, adapter):
    _sync(engine, adapter)
    before = _bits(engine.current_params())
    zero = LoraAdapter.from_peft({k: np.zeros_like(v) for k, v in adapter.tensors.items()}, adapter.config)
    engine.stage_adapter(engine.version + 1, zero)
    assert engine.abort()
    assert _bits(engine.current_params()) == before


def test_adapter_factors_round_trip_through_buckets_and_its_manifest(engine, adapter):
    factors = adapter_factors(adapter, engine.spec)
    packed = pack(factors.factors, plan_buckets(factors_spec(factors.factors), 1 << 20), version=3,
                  adapter=factors.config.to_meta())
    manifest = Manifest.from_bytes(packed.manifest.to_bytes())
    assert LoraConfig.from_meta(manifest.adapter).scale == adapter.config.scale
    from rollout.weights.buckets import unpack

    sent = LoraFactors(unpack(manifest, packed.buffers), LoraConfig.from_meta(manifest.adapter))
    version = engine.version + 1
    engine.stage_adapter(version, sent, finite_checked=True)
    engine.commit(version, wait=True)
    direct = engine.current_params()
    _sync(engine, adapter)
    assert _bits(engine.current_params()) == _bits(direct)


def test_an_adapters_serving_only_leaves_are_those_of_its_merged_weights(engine, adapter):
    _sync(engine, adapter)
    _, params, derived = engine.weights_snapshot()
    assert derived  # a tied embedding on CPU: its transposed copy
    assert _bits(derived) == _bits(engine.runner.derive(params))


def _qwix_leaves(engine: Engine, adapter: LoraAdapter) -> dict[str, np.ndarray]:
    """The adapter as qwix's LoraProvider keeps it in Tunix's Qwen3: <w>_lora_a (contracting dims, r),
    <w>_lora_b (r, remaining dims), with Tunix's weight names and head-split shapes."""
    from rollout.integrations.tunix_names import path_to_tunix, tunix_shape

    out = {}
    for kernel, (a, b) in check_factors(adapter.factors(engine.spec), engine.spec, adapter.config.rank).items():
        shape = tunix_shape(kernel, engine.spec.by_path()[kernel].shape, engine.model_config)
        contract = shape[:2] if kernel.endswith("o_proj.kernel") else shape[:1]
        remain = shape[len(contract):]
        name = path_to_tunix(kernel)
        out[f"{name}_lora_a"] = np.asarray(a).T.reshape(*contract, -1)
        out[f"{name}_lora_b"] = np.asarray(b).T.reshape(-1, *remain)
    return out


def test_tunix_qwix_lora_leaves_serve_the_same_weights_as_the_peft_adapter(engine, adapter):
    from rollout.integrations.tunix_lora import lora_leaves, qwix_lora_adapter

    leaves = _qwix_leaves(engine, adapter)
    nested: dict = {"final_norm": {"w": np.ones(4, np.float32)}}  # a base leaf beside them: not LoRA
    for name, value in leaves.items():
        node = nested
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    assert lora_leaves(nested).keys() == leaves.keys()
    qwix = qwix_lora_adapter(lora_leaves(nested), engine.spec, alpha=adapter.config.alpha)
    assert qwix.config.rank == adapter.config.rank and qwix.config.scale == adapter.config.scale
    _sync(engine, adapter)
    want = _bits(engine.current_params())
    _sync(engine, qwix)
    assert _bits(engine.current_params()) == want


def test_a_lone_qwix_factor_is_refused(engine, adapter):
    from rollout.integrations.tunix_lora import qwix_lora_adapter

    leaves = _qwix_leaves(engine, adapter)
    del leaves["layers.0.mlp.up_proj.kernel_lora_b"]
    with pytest.raises(LoraAdapterError, match="needs both _lora_a and _lora_b"):
        qwix_lora_adapter(leaves, engine.spec, alpha=8.0)
