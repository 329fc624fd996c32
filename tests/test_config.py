"""ModelConfig: what is read from config.json / generation_config.json, and what is refused.

A checkpoint asking for something the engine does not implement must be refused with an error
naming the field and its value, never served with silently wrong logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rollout.models.config import ModelConfig, UnsupportedConfigError
from rollout.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cfg") / "qwen3", "Qwen3ForCausalLM")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cfg") / "qwen2", "Qwen2ForCausalLM")


def hf_config(path: Path, **changes) -> dict:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    return config


def refusal(hf: dict) -> str:
    with pytest.raises(UnsupportedConfigError) as info:
        ModelConfig.from_hf(hf)
    return str(info.value)


def test_sliding_window_is_refused_naming_the_field_and_value(qwen2_dir):
    message = refusal(hf_config(qwen2_dir, use_sliding_window=True, sliding_window=4096))
    assert "use_sliding_window=True" in message and "4096" in message


def test_sliding_window_size_without_use_sliding_window_is_accepted(qwen2_dir):
    """Qwen2.5 configs carry sliding_window=32768 with use_sliding_window=false: full attention."""
    cfg = ModelConfig.from_hf(hf_config(qwen2_dir, use_sliding_window=False, sliding_window=32768))
    assert cfg.architecture == "Qwen2ForCausalLM"


def test_sliding_attention_layer_types_are_refused_naming_the_field_and_value(qwen3_dir):
    """transformers 5 records per-layer attention kinds in `layer_types`."""
    message = refusal(hf_config(qwen3_dir, layer_types=["full_attention", "sliding_attention"]))
    assert "layer_types" in message and "sliding_attention" in message


@pytest.mark.parametrize("key", ["rope_type", "type"])  # current and legacy spelling
def test_yarn_rope_scaling_is_refused_naming_the_field_and_value(qwen3_dir, key):
    scaling = {key: "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    message = refusal(hf_config(qwen3_dir, rope_scaling=scaling))
    assert "rope_scaling" in message and "'yarn'" in message


def test_yarn_rope_parameters_are_refused_naming_the_field_and_value(qwen3_dir):
    """transformers 5 writes RoPE scaling as `rope_parameters`, not `rope_scaling`."""
    params = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 32768}
    config = hf_config(qwen3_dir, rope_parameters=params)
    del config["rope_scaling"], config["rope_theta"]
    message = refusal(config)
    assert "rope_parameters" in message and "'yarn'" in message


def test_partial_rotary_factor_is_refused_naming_the_field_and_value(qwen3_dir):
    message = refusal(hf_config(qwen3_dir, partial_rotary_factor=0.5))
    assert "partial_rotary_factor=0.5" in message


def test_default_rope_scaling_is_accepted(qwen3_dir):
    cfg = ModelConfig.from_hf(hf_config(qwen3_dir, rope_scaling={"rope_type": "default"}))
    assert cfg.rope_theta == 10000.0


def test_unknown_architecture_is_refused_naming_it(qwen3_dir):
    message = refusal(hf_config(qwen3_dir, architectures=["LlamaForCausalLM"]))
    assert "architecture" in message and "LlamaForCausalLM" in message
    assert "Qwen3ForCausalLM" in message  # says what is supported


def test_missing_architectures_entry_is_refused(qwen3_dir):
    message = refusal(hf_config(qwen3_dir, architectures=[]))
    assert "architectures" in message


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_hidden_act_other_than_silu_is_refused_naming_the_field_and_value(qwen3_dir, act):
    message = refusal(hf_config(qwen3_dir, hidden_act=act))
    assert f"hidden_act={act!r}" in message


def test_qwen3_attention_bias_is_refused_naming_the_field(qwen3_dir):
    message = refusal(hf_config(qwen3_dir, attention_bias=True))
    assert "attention_bias=True" in message


def test_mixture_of_experts_is_refused(qwen3_dir):
    message = refusal(hf_config(qwen3_dir, num_experts=8))
    assert "num_experts" in message


def test_heads_not_a_multiple_of_kv_heads_is_refused_naming_both(qwen3_dir):
    message = refusal(hf_config(qwen3_dir, num_attention_heads=4, num_key_value_heads=3))
    assert "num_attention_heads=4" in message and "num_key_value_heads=3" in message


def test_from_pretrained_reads_eos_ids_from_generation_config(qwen3_dir, tmp_path):
    config = hf_config(qwen3_dir, eos_token_id=7)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [11, 7, 13]}))
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert set(cfg.eos_token_ids) == {7, 11, 13}


def test_from_pretrained_reads_a_single_int_eos_from_generation_config(qwen3_dir, tmp_path):
    config = hf_config(qwen3_dir, eos_token_id=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 13}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (13,)


def test_from_pretrained_of_a_tiny_checkpoint_has_im_end_and_endoftext_as_eos(qwen3_dir):
    generation = json.loads((qwen3_dir / "generation_config.json").read_text())
    cfg = ModelConfig.from_pretrained(qwen3_dir)
    assert set(cfg.eos_token_ids) == set(generation["eos_token_id"])


def test_from_pretrained_of_a_directory_without_config_json_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_qwen3_shapes_are_read_with_head_dim_from_the_config(qwen3_dir):
    cfg = ModelConfig.from_pretrained(qwen3_dir)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size) == (4, 2, 32, 64)
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.tie_word_embeddings


def test_qwen2_head_dim_is_hidden_over_heads_and_has_qkv_bias(qwen2_dir):
    cfg = ModelConfig.from_pretrained(qwen2_dir)
    assert cfg.head_dim == 64 // 4
    assert cfg.qkv_bias and not cfg.qk_norm


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen2ForCausalLM"])
def test_config_saved_by_transformers_5_reads_like_transformers_reads_it(tmp_path, architecture):
    """transformers 5 writes `rope_parameters: {rope_theta, rope_type}` and no top-level
    `rope_theta`; reading the default 10000 instead of Qwen's 1e6 would give wrong logits."""
    transformers = pytest.importorskip("transformers")
    config_class = {"Qwen3ForCausalLM": transformers.Qwen3Config, "Qwen2ForCausalLM": transformers.Qwen2Config}
    kwargs = dict(
        architectures=[architecture],
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    if architecture == "Qwen3ForCausalLM":
        kwargs["head_dim"] = 32
    config_class[architecture](**kwargs).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved  # the layout under test

    cfg = ModelConfig.from_pretrained(tmp_path)
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert cfg.rope_theta == reloaded.rope_parameters["rope_theta"] == 1_000_000.0
    assert cfg.rms_norm_eps == reloaded.rms_norm_eps
    head_dim = getattr(reloaded, "head_dim", None) or reloaded.hidden_size // reloaded.num_attention_heads
    assert cfg.head_dim == head_dim
    assert cfg.tie_word_embeddings is reloaded.tie_word_embeddings is True
