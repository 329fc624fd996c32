"""Staging new weights: validate, cast, check finiteness, and place them on devices.

Staged buffers are fresh device arrays: they never alias caller memory (an object-store buffer,
a trainer's array), so the caller may free or mutate its copy as soon as staging returns.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from rollout.weights.buckets import numpy_dtype
from rollout.weights.finite import count_non_finite, non_finite_error
from rollout.weights.spec import ParamSpec, SpecMismatchError, flatten_params


@dataclasses.dataclass(frozen=True)
class StagedWeights:
    version: int
    params: dict[str, jax.Array]
    nbytes: int
    seconds: float
    derived: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # see ModelRunner.derive


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


def stage_params(
    version: int,
    params: Any,
    spec: ParamSpec,
    place: Callable[[str, np.ndarray], jax.Array],
    *,
    finite_checked: bool = False,
) -> StagedWeights:
    """Validate `params` (any accepted tree) against `spec` and place every leaf.

    Raises SpecMismatchError (tree, shape, dtype kind) or NonFiniteWeightsError before any
    state of the engine changes; on error, already-placed leaves are simply dropped.
    `finite_checked`: the values were counted finite already (a packer did, and a checksum
    proves these are its bytes); skips that pass unless a leaf must be cast.
    """
    start = time.perf_counter()
    flat = flatten_params(params, spec)
    spec.check(ParamSpec.of(flat))
    want = spec.by_path()
    placed: dict[str, jax.Array] = {}
    for path in spec.paths:
        host = check_host_leaf(path, flat[path], want[path].dtype, check_finite=not finite_checked)
        placed[path] = place(path, host)
    jax.block_until_ready(placed)
    return StagedWeights(version, placed, spec.nbytes, time.perf_counter() - start)
