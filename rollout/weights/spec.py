"""ParamSpec: the paths, shapes and dtypes of a parameter tree, and validation with readable diffs.

Every parameter tree the product accepts (an nnx.State, a nested dict in engine layout, a flat
dict of dotted engine paths, or a flat dict of HF tensor names) is first flattened to
`{path: array}` with dotted engine paths, e.g. `layers.0.self_attn.q_proj.kernel`. An engine's
spec carries its family's HF name table (`spec.hf`), so whoever holds the spec (the coordinator
included, which has no jax) maps HF names exactly as the engine's loader does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rollout.weights.hf_names import HFNameError, HFNames, hf_to_engine


class SpecMismatchError(ValueError):
    """A parameter tree does not match the engine's tree structure, shapes or dtypes."""


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    path: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, e.g. "float32", "bfloat16"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Ordered leaf specs; the order is the order of the engine's parameter leaves. `hf`: the
    name table of the model's family (an engine's spec has one; a spec derived from an incoming
    tree or a manifest has none)."""

    leaves: tuple[LeafSpec, ...]
    hf: HFNames | None = None

    @classmethod
    def of(cls, flat: Mapping[str, Any]) -> ParamSpec:
        return cls(tuple(LeafSpec(p, tuple(int(d) for d in a.shape), _dtype_name(a.dtype)) for p, a in flat.items()))

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(leaf.path for leaf in self.leaves)

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    def by_path(self) -> dict[str, LeafSpec]:
        return {leaf.path: leaf for leaf in self.leaves}

    def check(self, incoming: ParamSpec, *, cast_floats: bool = True) -> None:
        """Raise SpecMismatchError unless `incoming` can be staged into an engine of this spec.

        Floating dtypes may differ (they are cast to the engine dtype) when `cast_floats`;
        a non-floating dtype where a float belongs, or any shape difference, is refused.
        """
        problems = self.diff(incoming, cast_floats=cast_floats)
        if problems:
            raise SpecMismatchError(
                "the parameter tree does not match the engine's (expected the engine's tree "
                "structure, shapes and dtypes; fix the tree or load a checkpoint of the same "
                "model):\n  " + "\n  ".join(problems)
            )

    def diff(self, incoming: ParamSpec, *, cast_floats: bool = True, limit: int = 8) -> list[str]:
        mine, theirs = self.by_path(), incoming.by_path()
        missing = [p for p in mine if p not in theirs]
        extra = [p for p in theirs if p not in mine]
        problems: list[str] = []
        if missing:
            problems.append(f"missing {len(missing)} path(s): {_short(missing, limit)}")
        if extra:
            problems.append(f"extra {len(extra)} path(s): {_short(extra, limit)}")
        shape_bad, dtype_bad = [], []
        for path, want in mine.items():
            got = theirs.get(path)
            if got is None:
                continue
            if got.shape != want.shape:
                shape_bad.append(f"{path}: expected shape {want.shape}, got {got.shape}")
            elif not _dtype_ok(want.dtype, got.dtype, cast_floats):
                dtype_bad.append(f"{path}: expected dtype {want.dtype}, got {got.dtype}")
        problems += shape_bad[:limit] + (["..."] if len(shape_bad) > limit else [])
        problems += dtype_bad[:limit] + (["..."] if len(dtype_bad) > limit else [])
        return problems


def _short(items: list[str], limit: int) -> str:
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def is_floating(name: str) -> bool:
    return name in ("bfloat16", "float16", "float32", "float64")


def _dtype_ok(want: str, got: str, cast_floats: bool) -> bool:
    if want == got:
        return True
    return cast_floats and is_floating(want) and is_floating(got)


def flatten_params(params: Any, spec: ParamSpec | None = None) -> dict[str, Any]:
    """Any accepted parameter tree -> `{dotted engine path: array}` (arrays are not copied).

    A flat dict of HF tensor names is mapped with `spec.hf` (the model's name table), onto
    `spec`'s paths.

    >>> flatten_params({"layers": {0: {"mlp": {"up_proj": {"kernel": 1}}}}, "norm": {"weight": 2}})
    {'layers.0.mlp.up_proj.kernel': 1, 'norm.weight': 2}
    """
    if hasattr(params, "to_pure_dict"):  # flax.nnx.State
        params = params.to_pure_dict()
    if not isinstance(params, Mapping):
        raise TypeError(
            f"expected a parameter tree (nnx.State, nested dict, or flat dict of paths or HF "
            f"names), got {type(params).__name__}"
        )
    flat: dict[str, Any] = {}
    _flatten_into(params, "", flat)
    names = spec.hf if spec is not None else None
    if any(_looks_hf(k, names) for k in flat):
        if spec is None or names is None:
            raise SpecMismatchError(
                "got HF tensor names (e.g. model.embed_tokens.weight) but no model spec to map them "
                "with; pass the engine's spec (engine.spec), or send engine paths"
            )
        try:
            return hf_to_engine(flat, names, spec.by_path())
        except HFNameError as err:
            raise SpecMismatchError(str(err)) from err
    return flat


def _flatten_into(node: Mapping[Any, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten_into(value, path + ".", out)
        elif hasattr(value, "get_value") and not hasattr(value, "shape"):  # nnx.Variable
            out[path] = value.get_value()
        else:
            out[path] = value


def _looks_hf(name: str, names: HFNames | None) -> bool:
    if names is not None:
        return names.to_path(name) is not None or names.stack_of(name) is not None or names.split_of(name) is not None
    return name.startswith("model.") or name == "lm_head.weight"


def spec_of_leaves(items: Iterable[tuple[str, tuple[int, ...], str]]) -> ParamSpec:
    return ParamSpec(tuple(LeafSpec(p, tuple(s), d) for p, s, d in items))
