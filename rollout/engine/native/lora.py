"""LoRA served merged: the resident base and the jitted merge onto it.

An engine keeps the pristine base resident (`ResidentBase`): the parameters of the last full
update it committed (or loaded). Staging an adapter builds a full parameter copy from that base,
never from what is served: each targeted kernel becomes

    W = W_base + scale * (B @ A)^T      # W, W_base (in, out); A (r, in); B (out, r)

computed on the devices in float32 (HIGHEST precision) and cast to the base dtype, with the
base's sharding; every other leaf is the base's own array (shared, not copied). Merging never
accumulates: every adapter starts from the base, and a module whose factor is all zeros keeps
the base's own array, so an all-zero adapter serves the base bit for bit after any number of
adapter versions.

Memory: the base stays resident beside the served (merged) copy, so an engine serving an adapter
holds one extra copy of the targeted kernels (two while a new adapter is staged); the rest of
the model is shared. The serving-only leaves (Runner.derive: a transposed tied embedding on
CPU) come from the embedding, which an adapter never changes: an adapter's copy reuses the
base's. A full update committed afterwards replaces the base and serves as is: it
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

from rollout.weights.lora import LoraConfig, check_factors
from rollout.weights.spec import ParamSpec

Params = dict[str, jax.Array]


def _merge(base: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """base (in, out) + scale * (B @ A)^T, computed in float32, in the base's dtype."""
    delta = jnp.einsum(
        "ri,or->io", a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return (base.astype(jnp.float32) + scale * delta).astype(base.dtype)


@functools.lru_cache(maxsize=64)
def _merge_fn(sharding: jax.sharding.Sharding) -> Any:
    # one program per (sharding, shapes); the scale is an argument, so new alphas never
    # recompile. One dispatch per kernel (measured on CPU: faster than one program merging
    # them all, whose kernels then run one after the other)
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
    not fit `spec`. A module whose A or B is all zeros keeps the base's own array (its delta is
    zero): an all-zero adapter serves the base bit for bit, with nothing computed."""
    pairs = check_factors(factors, spec, config.rank, check_finite=not finite_checked)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    scale = jnp.float32(config.scale)
    out = dict(base)
    for kernel, (a, b) in pairs.items():
        a_host, b_host = np.asarray(a), np.asarray(b)
        if not (a_host.any() and b_host.any()):
            continue  # B @ A = 0: the base as it is
        # small: every device gets both factors; they only feed the merge (the merged kernel
        # is a fresh array), so they may alias the host buffers until it is done
        a_dev, b_dev = jax.device_put([a_host, b_host], replicated)
        w = base[kernel]
        out[kernel] = _merge_fn(w.sharding)(w, a_dev, b_dev, scale)
    return out


class ResidentBase:
    """The base parameters adapters are merged onto, and which version they came with.

    The engine tells it about every full update it stages and every version it commits: a
    committed full update becomes the base; a committed adapter leaves it as it is.
    """

    def __init__(self, params: Params, derived: Params, version: int = 0):
        self._lock = threading.Lock()
        self.params = params
        self.derived = derived  # the runner's serving-only leaves of `params` (Runner.derive)
        self.version = version  # the version whose full update the base is (0: loaded at start)
        self._staged: tuple[int, Params, Params] | None = None  # a full update staged, not committed

    def staged_full(self, version: int, params: Params, derived: Params) -> None:
        with self._lock:
            self._staged = (version, params, derived)

    def staged_adapter(self, version: int) -> None:
        """A newer adapter replaced any full update that was staged."""
        with self._lock:
            if self._staged is not None and self._staged[0] <= version:
                self._staged = None

    def committed(self, version: int) -> None:
        with self._lock:
            if self._staged is not None and self._staged[0] == version:
                self.version, self.params, self.derived = self._staged
                self._staged = None
            elif self._staged is not None and self._staged[0] < version:
                self._staged = None

    def aborted(self, version: int | None) -> None:
        with self._lock:
            if self._staged is not None and (version is None or self._staged[0] == version):
                self._staged = None

    def current(self) -> tuple[Params, Params]:
        """(params, derived) of the base."""
        with self._lock:
            return self.params, self.derived
