"""Loading HF checkpoints: resolve a repo id or directory, read safetensors one tensor at a time,
map names through the model's name table (`spec.hf`) with strict checks, and place each tensor
on its devices. `checkpoint_spec` reads the same mapping from the safetensors headers alone.

`load_format="dummy"` builds the same tree from shapes alone so an engine can start and compile
before real weights arrive through a weight sync.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from rollout.weights.hf_names import (
    HFNameError,
    HFNames,
    ShapeOnly,
    assemble,
    engine_shape,
    stack_sizes,
    stream_to_engine,
    to_engine_layout,
)
from rollout.weights.spec import ParamSpec, SpecMismatchError, spec_of_leaves

ALLOW_PATTERNS = (
    "*.safetensors",
    "*.json",
    "tokenizer*",
    "vocab.*",
    "merges.txt",
)


class CheckpointError(ValueError):
    """A checkpoint's tensors do not fit the model its config.json describes."""


def resolve_checkpoint(model: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local HF directory, or a repo id fetched with huggingface_hub (honours HF_HUB_OFFLINE
    and the local cache; only safetensors, json and tokenizer files are downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith(("/", ".", "~")):
        raise FileNotFoundError(f"expected an HF checkpoint directory, {model!r} is not one")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id=str(model), revision=revision, allow_patterns=list(ALLOW_PATTERNS)
        )
    except Exception as err:  # offline, unknown repo, no access: say what to do
        raise FileNotFoundError(
            f"could not resolve {model!r} as a local directory or a Hugging Face repo id "
            f"({type(err).__name__}: {err}). Pass a local directory, or download it first with "
            "`huggingface-cli download` while online."
        ) from err
    return Path(local)


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}; expected HF safetensors weights")
    return files


def iter_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_name, array) one tensor at a time; only one tensor is in memory at once."""
    from safetensors import safe_open

    for file in safetensors_files(directory):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def tensor_names(directory: Path) -> list[str]:
    """The names of every tensor of a checkpoint, from the safetensors headers alone."""
    from safetensors import safe_open

    names: list[str] = []
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="numpy") as f:
            names += list(f.keys())
    return names


T = TypeVar("T")
Place = Callable[[str, np.ndarray], object]


def _names_of(spec: ParamSpec) -> HFNames:
    if spec.hf is None:
        raise ValueError("the spec carries no HF name table; use the engine's spec (ModelDef.spec)")
    return spec.hf


def load_checkpoint(
    directory: Path, spec: ParamSpec, place: Callable[[str, np.ndarray], T], *, progress: bool = False
) -> dict[str, T]:
    """Read every tensor, check it against `spec`, and `place(path, array)` it on devices.

    Raises CheckpointError naming the tensor for: a name that maps to no parameter, a parameter
    set twice, a wrong shape (both shapes given), parameters left unset, and, in a model with
    tied embeddings, an output head that differs from the embedding (an equal copy is skipped).
    """
    names = _names_of(spec)
    want = spec.by_path()
    out: dict[str, T] = {}
    source: dict[str, str] = {}
    all_names = tensor_names(directory)
    bar = tqdm(total=len(all_names), desc="loading weights", unit="tensor", disable=not progress)

    def unknown(name: str, array: np.ndarray, path: str) -> CheckpointError:
        if path:
            return CheckpointError(
                f"tensor {name!r} maps to {path!r}, which this model config does not have "
                "(check tie_word_embeddings, num_hidden_layers and the architecture in config.json)"
            )
        return CheckpointError(
            f"tensor {name!r} {tuple(array.shape)} maps to no parameter of this model; expected HF "
            f"names of its family, such as {names.to_hf(spec.paths[0])[0]!r} (is this the right architecture?)"
        )

    try:
        for name, path, transform, array in stream_to_engine(
            _counted(iter_tensors(directory), bar), names, want, all_names, unknown
        ):
            if path in out:
                raise CheckpointError(f"tensor {name!r} sets {path!r} twice (also set by {source[path]!r})")
            array = to_engine_layout(array, transform)
            expected = want[path].shape
            if tuple(array.shape) != expected:
                raise CheckpointError(
                    f"tensor {name!r} has shape {engine_shape(tuple(array.shape), transform)}, expected "
                    f"{engine_shape(expected, transform)} from config.json"
                )
            out[path] = place(path, array)
            source[path] = name
    except HFNameError as err:
        raise CheckpointError(str(err)) from err
    finally:
        bar.close()
    unset = [p for p in spec.paths if p not in out]
    if unset:
        missing = [names.to_hf(p)[0] for p in unset[:5]]
        more = f" and {len(unset) - 5} more" if len(unset) > 5 else ""
        raise CheckpointError(
            f"{len(unset)} parameter(s) left unset by the checkpoint: no tensor {missing}{more} "
            f"(engine paths {unset[:5]}); the safetensors files do not cover config.json's model "
            "(check num_hidden_layers and tie_word_embeddings in config.json)"
        )
    return {p: out[p] for p in spec.paths}


def _counted(tensors: Iterator[tuple[str, np.ndarray]], bar: Any) -> Iterator[tuple[str, np.ndarray]]:
    for item in tensors:
        bar.update(1)
        yield item


def checkpoint_spec(directory: Path, spec: ParamSpec) -> ParamSpec:
    """The engine-path spec of an HF checkpoint directory, read from the safetensors headers
    alone with `spec.hf`, to compare with `spec` before any worker reads a byte. A tied head
    is left out (its values are compared with the embedding when the checkpoint is loaded).
    Per-expert and fused MoE tensors are assembled as the loader does (`assemble`)."""
    names = _names_of(spec)
    paths = spec.by_path()
    leaves = []
    try:
        for name, header in assemble(_headers(directory), names, stack_sizes(names, paths)):
            kind, path, transform = names.classify(name, paths)
            if kind in ("ignored", "tied"):
                continue
            if kind == "unknown" and not path:
                raise SpecMismatchError(f"checkpoint tensor {name!r} maps to no parameter of this model")
            leaves.append((path, engine_shape(header.shape, transform), header.dtype))
    except HFNameError as err:
        raise SpecMismatchError(str(err)) from err
    return spec_of_leaves(leaves)


def _headers(directory: Path) -> Iterator[tuple[str, ShapeOnly]]:
    """(name, shape and dtype) of every tensor, from the safetensors headers alone."""
    from safetensors import safe_open

    for file in safetensors_files(directory):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                piece = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype().lower())
                yield name, ShapeOnly(tuple(piece.get_shape()), dtype)


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
