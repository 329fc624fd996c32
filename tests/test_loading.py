"""Loading HF checkpoints: strict name-table checks with messages naming the tensor, sharded
checkpoints, path / repo-id resolution, and load_format="dummy" giving the real tree.

Broken checkpoints are made by rewriting a tiny checkpoint's safetensors with safetensors.numpy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rollout.models.bind import ModelDef
from rollout.models.config import ModelConfig
from rollout.testing import make_tiny_checkpoint
from rollout.weights.loader import CheckpointError, load_checkpoint, resolve_checkpoint
from rollout.weights.spec import SpecMismatchError, flatten_params

SHARD_BYTES = 40_000  # the tiny Qwen3 (~0.3 MB) splits into several shards


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loading")


@pytest.fixture(scope="module")
def single(root) -> Path:
    return make_tiny_checkpoint(root / "single", "Qwen3ForCausalLM", seed=5)


@pytest.fixture(scope="module")
def sharded(root) -> Path:
    return make_tiny_checkpoint(root / "sharded", "Qwen3ForCausalLM", seed=5, shard_max_bytes=SHARD_BYTES)


def load_host(path: Path) -> dict[str, np.ndarray]:
    """Load a checkpoint to host arrays through the strict loader."""
    cfg = ModelConfig.from_pretrained(path)
    spec = ModelDef.create(cfg).spec
    return load_checkpoint(path, spec, lambda _, a: np.array(a))


def load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_host(path)
    return str(info.value)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_single(path: Path, edit) -> None:
    """Rewrite model.safetensors with `edit(tensors)` applied (it mutates the dict)."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


# -- strict checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.mlp.experts_gate.weight",  # matches no rule of the name table
        "model.layers.0.self_attn.o_proj.bias",  # no such parameter in Qwen (o_proj has no bias)
        "model.layers.7.mlp.up_proj.weight",  # a layer the 2-layer config does not have
    ],
)
def test_unmapped_tensor_is_refused_naming_it(single, tmp_path, name):
    path = copy_checkpoint(single, tmp_path / "ckpt")
    edit_single(path, lambda t: t.__setitem__(name, np.zeros((64, 64), np.float32)))
    assert name in load_error(path)


def test_tensor_in_two_shards_is_refused_as_set_twice_naming_it(sharded, tmp_path):
    path = copy_checkpoint(sharded, tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    first, second = load_file(path / files[0]), load_file(path / files[1])
    name = next(iter(first))
    second[name] = first[name]  # the same tensor, also in the second shard
    save_file(second, str(path / files[1]), metadata={"format": "pt"})

    message = load_error(path)
    assert name in message and "twice" in message


@pytest.mark.parametrize(
    "name, bad_shape, good_shape",
    [
        # HF (out, in) layout is what the message shows, though the engine stores (in, out)
        ("model.layers.1.self_attn.q_proj.weight", (128, 48), (128, 64)),
        ("model.layers.0.self_attn.k_norm.weight", (16,), (32,)),
        ("model.embed_tokens.weight", (500, 64), (512, 64)),
    ],
)
def test_wrong_shape_is_refused_naming_the_tensor_and_both_shapes(single, tmp_path, name, bad_shape, good_shape):
    path = copy_checkpoint(single, tmp_path / "ckpt")
    edit_single(path, lambda t: t.__setitem__(name, np.zeros(bad_shape, np.float32)))
    message = load_error(path)
    assert name in message and str(bad_shape) in message and str(good_shape) in message


@pytest.mark.parametrize(
    "name", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight", "model.layers.0.self_attn.q_norm.weight"]
)
def test_parameter_left_unset_is_refused_naming_the_tensor(single, tmp_path, name):
    path = copy_checkpoint(single, tmp_path / "ckpt")
    edit_single(path, lambda t: t.pop(name))
    message = load_error(path)
    assert name in message and "unset" in message


def test_untied_config_with_a_tied_checkpoint_is_refused_naming_lm_head(single, tmp_path):
    path = copy_checkpoint(single, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert "lm_head.weight" in load_error(path)


def test_tied_checkpoint_carrying_an_lm_head_copy_loads(single, tmp_path):
    """Some tied checkpoints store lm_head.weight too; the embedding is what counts."""
    path = copy_checkpoint(single, tmp_path / "ckpt")
    edit_single(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    loaded = load_host(path)
    assert "lm_head.kernel" not in loaded
    np.testing.assert_array_equal(loaded["embed_tokens"], load_host(single)["embed_tokens"])


def test_tied_checkpoint_whose_lm_head_differs_from_the_embedding_is_refused_saying_the_model_ties_them(
    single, tmp_path
):
    path = copy_checkpoint(single, tmp_path / "ckpt")
    edit_single(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 1))
    message = load_error(path)
    assert "lm_head.weight" in message and "ties them" in message and "tie_word_embeddings" in message


# -- the HF-name mapping of a dict (what sync_weights and engine.stage take) ------------------


def hf_dict(path: Path) -> dict[str, np.ndarray]:
    return load_file(path / "model.safetensors")


def test_hf_dict_maps_onto_the_same_arrays_the_loader_loads(single):
    spec = ModelDef.create(ModelConfig.from_pretrained(single)).spec
    mapped = flatten_params(hf_dict(single), spec)
    loaded = load_host(single)
    assert sorted(mapped) == sorted(loaded)
    for path in loaded:
        np.testing.assert_array_equal(mapped[path], loaded[path], err_msg=path)


def test_hf_dict_of_a_tied_model_carrying_lm_head_maps_like_the_same_tensors_on_disk(single, tmp_path):
    """model.state_dict() of a tied transformers model holds lm_head.weight (the embedding itself)."""
    tensors = hf_dict(single)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    path = copy_checkpoint(single, tmp_path / "ckpt")
    edit_single(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    spec = ModelDef.create(ModelConfig.from_pretrained(single)).spec
    mapped = flatten_params(tensors, spec)
    assert "lm_head.kernel" not in mapped and sorted(mapped) == sorted(load_host(path))


def test_hf_dict_whose_lm_head_differs_from_a_tied_embedding_is_refused_saying_the_model_ties_them(single):
    tensors = hf_dict(single)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 2
    spec = ModelDef.create(ModelConfig.from_pretrained(single)).spec
    with pytest.raises(SpecMismatchError, match="ties them"):
        flatten_params(tensors, spec)


def test_hf_dict_with_an_unmapped_name_is_refused_naming_it(single):
    tensors = {**hf_dict(single), "model.layers.0.mlp.experts_gate.weight": np.zeros(3, np.float32)}
    spec = ModelDef.create(ModelConfig.from_pretrained(single)).spec
    with pytest.raises(SpecMismatchError, match="experts_gate"):
        flatten_params(tensors, spec)


def test_every_parameter_has_an_hf_name_that_maps_back_to_it(single):
    spec = ModelDef.create(ModelConfig.from_pretrained(single)).spec
    for path in spec.paths:
        name, transform = spec.hf.to_hf(path)
        assert spec.hf.to_path(name) == (path, transform)


# -- sharded checkpoints ----------------------------------------------------------------------


def test_sharded_checkpoint_loads_identically_to_the_unsharded_one(single, sharded):
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    a, b = load_host(single), load_host(sharded)
    assert list(a) == list(b)
    for path in a:
        assert a[path].dtype == b[path].dtype, path
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


def test_loaded_linear_kernels_are_the_transposed_hf_weights(single):
    tensors = load_file(single / "model.safetensors")
    loaded = load_host(single)
    np.testing.assert_array_equal(
        loaded["layers.0.self_attn.q_proj.kernel"], tensors["model.layers.0.self_attn.q_proj.weight"].T
    )
    np.testing.assert_array_equal(loaded["embed_tokens"], tensors["model.embed_tokens.weight"])


def test_index_naming_a_missing_shard_file_is_refused_naming_it(sharded, tmp_path):
    path = copy_checkpoint(sharded, tmp_path / "ckpt")
    victim = sorted(path.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    assert victim.name in load_error(path)


def test_directory_without_safetensors_is_refused(single, tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(single / "config.json", path / "config.json")
    assert "safetensors" in load_error(path)


# -- resolving a model argument ---------------------------------------------------------------


def test_local_directory_resolves_to_itself(single):
    assert resolve_checkpoint(single) == single
    assert resolve_checkpoint(str(single)) == single


@pytest.mark.parametrize("kind", ["absolute", "relative", "file"])
def test_missing_local_path_is_a_clear_file_not_found_error(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    model = {
        "absolute": str(tmp_path / "no-such-checkpoint"),
        "relative": "./no-such-checkpoint",
        "file": str(tmp_path / "weights.safetensors"),  # exists, but is not a directory
    }[kind]
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint(model)
    assert model in str(info.value) and "directory" in str(info.value)


def test_unknown_repo_id_offline_is_a_clear_file_not_found_error_without_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts: list[object] = []

    def no_network(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test forbids network access (to {address})")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)

    repo = "rollout-tests/no-such-model-3f9c1e"
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint(repo)
    message = str(info.value)
    assert repo in message and "local directory" in message
    assert attempts == []


# -- load_format="dummy" ----------------------------------------------------------------------


def test_dummy_load_has_the_real_tree_shapes_dtypes_and_shardings(root):
    """On 4 devices in bfloat16, with biases, an untied head and replicated KV heads (kv 2 < 4)."""
    import jax

    from rollout.engine import EngineConfig
    from rollout.engine.native.engine import Engine

    path = make_tiny_checkpoint(root / "qwen2", "Qwen2ForCausalLM", seed=5, tie_word_embeddings=False)
    devices = jax.devices()[:4]
    config = EngineConfig(max_batch=2, max_seq_len=32, dtype="bfloat16")
    with Engine(path, config, devices=devices) as real:
        real_params = real.current_params()
    with Engine(path, dataclasses.replace(config, load_format="dummy"), devices=devices) as dummy:
        dummy_params = dummy.current_params()

    assert list(dummy_params) == list(real_params)
    for path_, want in real_params.items():
        got = dummy_params[path_]
        assert (got.shape, got.dtype) == (want.shape, want.dtype), path_
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim), (path_, got.sharding, want.sharding)
    assert {str(a.dtype) for a in real_params.values()} == {"bfloat16"}
    assert any(not a.sharding.is_fully_replicated for a in real_params.values())
