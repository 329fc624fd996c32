"""Weights onto the engine's devices: validate, cast, check finiteness, and place them.

Three sources, one result (a dict path -> device array in the engine's shardings): a tree from
a caller or a sync (`place_params`), an HF checkpoint on disk (`load_params`), and shapes alone
(`dummy_params`). Placed buffers are fresh device arrays: they never alias caller memory (an
object-store buffer, a trainer's array), so the caller may free or mutate its copy as soon as
placing returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import jax
import numpy as np

from rollout.weights.buckets import numpy_dtype
from rollout.weights.finite import count_non_finite, non_finite_error
from rollout.weights.loader import load_checkpoint
from rollout.weights.spec import ParamSpec, SpecMismatchError, flatten_params

Place = Callable[[str, np.ndarray], jax.Array]  # (path, host array) -> device array, never aliasing
Derived = dict[str, jax.Array]  # serving-only leaves a backend computes from a copy (ModelRunner.derive)
P = TypeVar("P")  # a backend's placed parameters: native {path: array}; sglang-jax its state leaves


@dataclasses.dataclass(frozen=True)
class StagedWeights(Generic[P]):
    """One placed copy of the weights, as a backend serves it (rollout.engine.weight_state)."""

    version: int
    params: P
    derived: Derived  # empty where a backend derives nothing (sglang-jax)
    seconds: float  # to build, place and derive the copy


def check_host_leaf(path: str, array: Any, want_dtype: str, *, check_finite: bool = True) -> np.ndarray:
    """One leaf to a host array in the engine dtype, refusing non-finite values (unless the
    caller says they were counted already: `check_finite=False`)."""
    host = np.asarray(array)
    if host.dtype.name != want_dtype:
        if host.dtype.kind not in "fV" and host.dtype.name != "bfloat16":
            raise SpecMismatchError(f"{path}: expected a floating dtype ({want_dtype}), got {host.dtype.name}")
        with np.errstate(over="ignore"):  # an overflow to Inf is refused just below
            host = host.astype(numpy_dtype(want_dtype))
        check_finite = True
    if check_finite:
        bad = count_non_finite(host)
        if bad:
            raise non_finite_error(path, bad)
    return host


def place_params(params: Any, spec: ParamSpec, place: Place, *, finite_checked: bool = False) -> dict[str, jax.Array]:
    """Validate `params` (any accepted tree) against `spec` and place every leaf.

    Raises SpecMismatchError (tree, shape, dtype kind) or NonFiniteWeightsError before any
    state of the engine changes; on error, already-placed leaves are simply dropped.
    `finite_checked`: the values were counted finite already (a packer did, and a checksum
    proves these are its bytes); skips that pass unless a leaf must be cast.
    """
    flat = flatten_params(params, spec)
    spec.check(ParamSpec.of(flat))
    want = spec.by_path()
    return {
        path: place(path, check_host_leaf(path, flat[path], want[path].dtype, check_finite=not finite_checked))
        for path in spec.paths
    }


def load_params(directory: Path, spec: ParamSpec, place: Place, *, progress: bool = False) -> dict[str, jax.Array]:
    """The weights of an HF checkpoint directory, read one tensor at a time onto the devices
    (cast to the engine dtype and checked finite on the way)."""
    want = spec.by_path()

    def place_checked(path: str, array: np.ndarray) -> jax.Array:
        return place(path, check_host_leaf(path, array, want[path].dtype))

    return load_checkpoint(directory, spec, place_checked, progress=progress)


def dummy_params(spec: ParamSpec, shardings: Mapping[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
    """Parameters of the right tree, shapes, dtypes and shardings, from shapes alone: zeros,
    and ones for norm weights. Generation runs (uniform logits) until a real sync."""
    out = {}
    for leaf in spec.leaves:
        fill = jax.numpy.ones if leaf.path.endswith("norm.weight") else jax.numpy.zeros
        make = jax.jit(lambda f=fill, lf=leaf: f(lf.shape, lf.dtype), out_shardings=shardings[leaf.path])
        out[leaf.path] = make()
    return out
