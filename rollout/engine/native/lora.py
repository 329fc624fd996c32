"""LoRA served merged: the resident base and the jitted merge onto it.

An engine keeps the pristine base resident (`ResidentBase`): the parameters of the last full
update it committed (or loaded). Staging an adapter builds a full parameter copy from that base,
never from what is served: each targeted kernel becomes

    W = W_base + scale * (B @ A)^T      # W, W_base (in, out); A (r, in); B (out, r)

computed on the devices in float32 (HIGHEST precision) and cast to the base dtype, with the
base's sharding; every other leaf is the base's own array (shared, not copied). Merging never
accumulates: an element whose delta is exactly zero keeps the base's bits, so an all-zero
adapter serves the base bit for bit, after any number of adapter versions.

Memory: the base stays resident beside the served (merged) copy, so an engine serving an adapter
holds one extra copy of the targeted kernels (two while a new adapter is staged); the rest of
the model is shared. A full update committed afterwards replaces the base and serves as is: it
drops the adapter (the next adapter sync merges onto the new base).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rollout.engine import placement
from rollout.weights.lora import LoraConfig, check_factors
from rollout.weights.spec import ParamSpec

Params = dict[str, jax.Array]


def _merge(base: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """base (in, out) + scale * (B @ A)^T, in float32; exact base bits where the delta is 0."""
    delta = jnp.einsum(
        "ri,or->io", a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    ) * scale
    merged = (base.astype(jnp.float32) + delta).astype(base.dtype)
    return jnp.where(delta == 0, base, merged)


@functools.cache
def _merge_fn(sharding: jax.sharding.Sharding) -> Any:
    # one program per (sharding, shapes): the scale is an argument, so new alphas never recompile
    return jax.jit(_merge, out_shardings=sharding)


def merge_adapter(
    base: Mapping[str, jax.Array],
    factors: Mapping[str, Any],
    config: LoraConfig,
    spec: ParamSpec,
    mesh: jax.sharding.Mesh,
    *,
    finite_checked: bool = False,
) -> Params:
    """Full parameters: `base` with the adapter's `factors` (rollout.weights.lora: factor paths)
    merged into its kernels. Raises LoraAdapterError (nothing placed is kept) if the factors do
    not fit `spec`."""
    pairs = check_factors(factors, spec, config.rank, check_finite=not finite_checked)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    scale = jnp.float32(config.scale)
    out = dict(base)
    for kernel, (a, b) in pairs.items():
        w = base[kernel]
        a_dev = placement.place(np.asarray(a), replicated)  # small: every device gets both factors
        b_dev = placement.place(np.asarray(b), replicated)
        out[kernel] = _merge_fn(w.sharding)(w, a_dev, b_dev, scale)
    return out


class ResidentBase:
    """The base parameters adapters are merged onto, and which version they came with.

    The engine tells it about every full update it stages and every version it commits: a
    committed full update becomes the base; a committed adapter leaves it as it is.
    """

    def __init__(self, params: Params, version: int = 0):
        self._lock = threading.Lock()
        self.params = params
        self.version = version  # the version whose full update the base is (0: loaded at start)
        self._staged: tuple[int, Params] | None = None  # a full update staged, not yet committed

    def staged_full(self, version: int, params: Params) -> None:
        with self._lock:
            self._staged = (version, params)

    def staged_adapter(self, version: int) -> None:
        """A newer adapter replaced any full update that was staged."""
        with self._lock:
            if self._staged is not None and self._staged[0] <= version:
                self._staged = None

    def committed(self, version: int) -> None:
        with self._lock:
            if self._staged is not None and self._staged[0] == version:
                self.version, self.params = self._staged
                self._staged = None
            elif self._staged is not None and self._staged[0] < version:
                self._staged = None

    def aborted(self, version: int | None) -> None:
        with self._lock:
            if self._staged is not None and (version is None or self._staged[0] == version):
                self._staged = None

    def current(self) -> Params:
        with self._lock:
            return self.params
