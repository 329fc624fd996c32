"""Tests of rollout.testing: the generated checkpoints are real HF checkpoints, deterministic,
and their models make peaked next-token predictions."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from rollout.testing import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TINY_QWEN3,
    make_bench_checkpoint,
    make_tiny_checkpoint,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["Hello, who are you?", "What is 12 * 7?", "你是谁", "The quick brown fox"]


def _load_model(path: pathlib.Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _all_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def qwen3_model(qwen3: pathlib.Path):
    return _load_model(qwen3)


@pytest.mark.parametrize(
    "architecture, overrides",
    [
        ("Qwen3ForCausalLM", {}),
        ("Qwen3ForCausalLM", {"tie_word_embeddings": False}),
        ("Qwen3ForCausalLM", {"attention_bias": True}),
        ("Qwen2ForCausalLM", {}),
        ("Qwen2ForCausalLM", {"tie_word_embeddings": False}),
        ("Qwen3ForCausalLM", {"shard_max_bytes": 40_000}),
        ("Qwen2ForCausalLM", {"shard_max_bytes": 40_000, "tie_word_embeddings": False}),
    ],
    ids=["qwen3-tied", "qwen3-untied", "qwen3-bias", "qwen2-tied", "qwen2-untied", "qwen3-sharded", "qwen2-sharded"],
)
def test_transformers_loads_checkpoint_and_runs_forward(
    tmp_path: pathlib.Path, architecture: str, overrides: dict
) -> None:
    path = make_tiny_checkpoint(tmp_path, architecture, **overrides)
    model = _load_model(path)
    assert type(model).__name__ == architecture
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Hello 你是谁", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], TINY_QWEN3["vocab_size"])
    assert torch.isfinite(logits).all()


def test_qwen3_config_is_hf_format(qwen3: pathlib.Path) -> None:
    config = json.loads((qwen3 / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["model_type"] == "qwen3"
    assert {k: config[k] for k in TINY_QWEN3} == TINY_QWEN3
    assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
    assert config["attention_bias"] is False and config["rope_scaling"] is None
    assert config["use_sliding_window"] is False and config["sliding_window"] is None
    assert config["hidden_act"] == "silu" and config["torch_dtype"] == "float32"


def test_qwen2_config_has_no_head_dim(tmp_path: pathlib.Path) -> None:
    config = json.loads((make_tiny_checkpoint(tmp_path, "Qwen2ForCausalLM") / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert "head_dim" not in config


def test_qwen2_has_qkv_biases_and_qwen3_has_qk_norms(tmp_path: pathlib.Path, qwen3: pathlib.Path) -> None:
    qwen2 = _all_tensors(make_tiny_checkpoint(tmp_path, "Qwen2ForCausalLM"))
    assert qwen2["model.layers.0.self_attn.q_proj.bias"].shape == (64,)
    assert qwen2["model.layers.1.self_attn.k_proj.bias"].shape == (32,)
    assert not any("norm.weight" in n and "self_attn" in n for n in qwen2)
    q3 = _all_tensors(qwen3)
    assert q3["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    assert q3["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert q3["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 32)
    assert not any(n.endswith(".bias") for n in q3)


def test_lm_head_is_written_only_when_untied(tmp_path: pathlib.Path, qwen3: pathlib.Path) -> None:
    assert "lm_head.weight" not in _all_tensors(qwen3)
    untied = _all_tensors(make_tiny_checkpoint(tmp_path, tie_word_embeddings=False))
    assert untied["lm_head.weight"].shape == (512, 64)


def test_sharded_checkpoint_has_index_and_same_weights(tmp_path: pathlib.Path, qwen3: pathlib.Path) -> None:
    path = make_tiny_checkpoint(tmp_path, shard_max_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == files
    for file in files:
        with safe_open(str(path / file), "np") as f:
            assert all(index["weight_map"][name] == file for name in f.keys())  # noqa: SIM118 - a safe_open handle is not iterable
    sharded, single = _all_tensors(path), _all_tensors(qwen3)
    assert sharded.keys() == single.keys()
    assert all(np.array_equal(sharded[n], single[n]) for n in single)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in single.values())


def test_files_are_deterministic_for_a_seed(tmp_path: pathlib.Path, qwen3: pathlib.Path) -> None:
    again = make_tiny_checkpoint(tmp_path)
    for file in qwen3.iterdir():
        assert (again / file.name).read_bytes() == file.read_bytes(), file.name


def test_weights_differ_across_seeds(tmp_path: pathlib.Path, qwen3: pathlib.Path) -> None:
    seed0, seed1 = _all_tensors(qwen3), _all_tensors(make_tiny_checkpoint(tmp_path, seed=1))
    assert seed0.keys() == seed1.keys()
    assert not any(np.array_equal(seed0[n], seed1[n]) for n in seed0)


def test_unknown_override_raises_naming_it(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TypeError, match="hidden_sise"):
        make_tiny_checkpoint(tmp_path, hidden_sise=32)


def test_head_dim_override_on_qwen2_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TypeError, match="Qwen2 derives head_dim"):
        make_tiny_checkpoint(tmp_path, "Qwen2ForCausalLM", head_dim=32)


def test_overrides_reach_config_and_tokenizer_fits_small_vocab(tmp_path: pathlib.Path) -> None:
    path = make_tiny_checkpoint(tmp_path, vocab_size=300, num_hidden_layers=1, rope_theta=1e6)
    config = json.loads((path / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"], config["rope_theta"]) == (300, 1, 1e6)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) <= 300
    assert max(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))) < 300
    assert _all_tensors(path)["model.embed_tokens.weight"].shape == (300, 64)


def test_too_small_vocab_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        make_tiny_checkpoint(tmp_path, vocab_size=MIN_VOCAB_SIZE - 1)


def test_default_tokenizer_fits_the_vocab(qwen3: pathlib.Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3)
    assert 400 <= len(tokenizer) <= TINY_QWEN3["vocab_size"]


def test_eos_ids_in_configs_are_im_end_and_endoftext(qwen3: pathlib.Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    generation = json.loads((qwen3 / "generation_config.json").read_text())
    config = json.loads((qwen3 / "config.json").read_text())
    assert generation["eos_token_id"] == [im_end, endoftext]
    assert config["eos_token_id"] == im_end and config["bos_token_id"] == endoftext
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_next_token_distribution_is_peaked(qwen3_model) -> None:
    probs, gaps = [], []
    with torch.no_grad():
        for ids in ([3, 4, 5, 6], list(range(100, 109)), list(range(200, 216))):
            logits = qwen3_model(torch.tensor([ids])).logits[0]  # (seq, vocab)
            probs.append(torch.softmax(logits, -1).max(-1).values)
            top2 = torch.topk(logits, 2, dim=-1).values
            gaps.append(top2[:, 0] - top2[:, 1])
    top1_prob, gap = torch.cat(probs), torch.cat(gaps)
    # A near-uniform model over 512 tokens has top-1 probability ~0.002 and gaps ~0.
    assert top1_prob.mean() > 0.5
    assert gap.median() > 1.0


def test_greedy_continuations_are_not_a_single_repeated_token(qwen3: pathlib.Path, qwen3_model) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3)
    distinct = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = qwen3_model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        distinct.append(len(set(out[0, ids.shape[1]:].tolist())))
    assert min(distinct) >= 3, distinct


def test_bench_checkpoint_has_60_to_80m_parameters(tmp_path: pathlib.Path) -> None:
    path = make_bench_checkpoint(tmp_path)
    with safe_open(str(path / "model.safetensors"), "np") as f:
        count = sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())  # noqa: SIM118 - a safe_open handle is not iterable
    assert 60e6 <= count <= 80e6
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 32000 and config["model_type"] == "qwen3"


def test_tiny_moe_checkpoint_loads_in_transformers_and_in_rollout(tmp_path: pathlib.Path) -> None:
    from rollout.models.bind import ModelDef
    from rollout.models.config import ModelConfig
    from rollout.weights.loader import load_checkpoint

    path = make_tiny_checkpoint(tmp_path / "moe", "Qwen3MoeForCausalLM", mlp_only_layers=[1])
    model = _load_model(path)  # no missing or unexpected tensor
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.moe_layers == (0,) and cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    params = load_checkpoint(path, ModelDef.create(cfg, "float32").spec, lambda _p, a: a)
    assert set(params) == set(ModelDef.create(cfg, "float32").paths)  # every leaf, the experts stacked
