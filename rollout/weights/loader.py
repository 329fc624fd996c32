"""Loading HF checkpoints: resolve a repo id or directory, read safetensors one tensor at a time,
map names through the name table with strict checks, and place each tensor on its devices.

`load_format="dummy"` builds the same tree from shapes alone so an engine can start and compile
before real weights arrive through a weight sync.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from rollout.weights.hf_names import IGNORED, hf_to_path, path_to_hf, to_engine_layout
from rollout.weights.spec import ParamSpec

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
            for name in f.keys():
                yield name, f.get_tensor(name)


def count_tensors(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="numpy") as f:
            total += len(list(f.keys()))
    return total


Place = Callable[[str, np.ndarray], object]


def load_checkpoint(
    directory: Path,
    spec: ParamSpec,
    place: Place,
    *,
    tie_word_embeddings: bool,
    progress: bool = False,
) -> dict[str, object]:
    """Read every tensor, check it against `spec`, and `place(path, array)` it on devices.

    Raises CheckpointError naming the tensor for: a name that maps to no parameter, a parameter
    set twice, a wrong shape (both shapes given), and parameters left unset.
    """
    want = spec.by_path()
    out: dict[str, object] = {}
    source: dict[str, str] = {}
    bar = tqdm(total=count_tensors(directory), desc="loading weights", unit="tensor", disable=not progress)
    for name, array in iter_tensors(directory):
        bar.update(1)
        target = hf_to_path(name)
        if target is None:
            if IGNORED.search(name):
                continue
            raise CheckpointError(
                f"tensor {name!r} {tuple(array.shape)} maps to no parameter of this model; "
                "expected HF Qwen names (is this the right architecture?)"
            )
        path, transpose = target
        if path == "lm_head.kernel" and tie_word_embeddings:
            continue  # tied checkpoints sometimes store a copy; the embedding is what counts
        if path not in want:
            raise CheckpointError(
                f"tensor {name!r} maps to {path!r}, which this model config does not have "
                "(check tie_word_embeddings, num_hidden_layers and the architecture in config.json)"
            )
        if path in out:
            raise CheckpointError(f"tensor {name!r} sets {path!r} twice (also set by {source[path]!r})")
        array = to_engine_layout(array, transpose)
        expected = want[path].shape
        if tuple(array.shape) != expected:
            hf_expected = expected[::-1] if transpose else expected
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(array.shape)[::-1] if transpose else tuple(array.shape)}, "
                f"expected {hf_expected} from config.json"
            )
        out[path] = place(path, array)
        source[path] = name
    bar.close()
    unset = [p for p in spec.paths if p not in out]
    if unset:
        missing = [path_to_hf(p)[0] for p in unset[:5]]
        more = f" and {len(unset) - 5} more" if len(unset) > 5 else ""
        raise CheckpointError(
            f"{len(unset)} parameter(s) left unset by the checkpoint: no tensor {missing}{more} "
            f"(engine paths {unset[:5]}); the safetensors files do not cover config.json's model "
            "(check num_hidden_layers and tie_word_embeddings in config.json)"
        )
    return {p: out[p] for p in spec.paths}
