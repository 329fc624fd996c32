"""Quantizing the native engine's weights as they are placed: every load, dummy init and sync.

`EngineConfig(quantization="int8")` quantizes, per output channel (rollout.models.quant):

- every Linear kernel: q/k/v/o, gate/up/down, and an untied `lm_head.kernel`;
- the output head of a tied model where the runner derives a (hidden, vocab) copy of the
  embedding for it (CPU: `head_t`): the largest matmul of a decode step at small models.

The embedding table stays in the engine dtype: a lookup reads B rows per step, not the table,
so quantizing it saves memory but no time, and its values are the tied head's source. Norms and
biases stay too (tiny). MoE models are refused: their stacked experts (rollout.models.moe) go
through a grouped matmul that has no quantized variant yet; serve them in float32/bfloat16.

The engine keeps validating against its full-precision spec, exactly as without quantization:
an update is checked (tree, shapes, dtype kind), cast and counted finite on the host, and only
then placed and quantized on the devices, leaf by leaf, inside the same stage -> commit as any
update: the scales are computed from the values they scale, never carried over from an older
version. A rejected update leaves the serving weights, version and outputs untouched.

"fp8" (e4m3) needs matmuls that run fp8 (TPU v5p and later, NVIDIA compute capability 8.9+:
L4, H100): elsewhere (the CPU included) it is refused when the engine is built, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rollout.errors import UnsupportedConfigError
from rollout.models.bind import ModelDef
from rollout.models.quant import QuantizedKernel, chunk_cols, quantize

FP8_TPU_KINDS = ("v5p", "v6", "v7")  # TPU generations whose matrix units take fp8


def fp8_refusal(devices: Sequence[Any]) -> str | None:
    """Why fp8 cannot run on `devices`, or None if it can.

    >>> fp8_refusal(jax.devices("cpu"))[:44]
    'quantization="fp8" needs matmuls in fp8 (e4m'
    """
    device = devices[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform == "tpu" and any(k in kind for k in FP8_TPU_KINDS):
        return None
    if device.platform == "gpu":
        capability = str(getattr(device, "compute_capability", "0"))
        major, _, minor = capability.partition(".")
        if (int(major or 0), int(minor or 0)) >= (8, 9):
            return None
    return (
        f'quantization="fp8" needs matmuls in fp8 (e4m3): TPU v5p or later, or an NVIDIA GPU of '
        f"compute capability 8.9+ (L4, H100); these devices are {device.platform} ({kind or 'unknown kind'}). "
        'Use quantization="int8" (weight-only, runs everywhere) or none'
    )


def check_quantization(quantization: str | None, model_def: ModelDef, devices: Sequence[Any]) -> None:
    """Refuse what this engine cannot quantize, before anything is loaded (UnsupportedConfigError)."""
    if quantization is None:
        return
    if model_def.config.is_moe:
        raise UnsupportedConfigError(
            f"quantization={quantization!r} is not supported for mixture-of-experts models yet "
            f"({model_def.config.architecture}: its stacked experts have no quantized grouped matmul); "
            "serve it with quantization=None (float32 or bfloat16)"
        )
    if quantization == "fp8":
        why = fp8_refusal(devices)
        if why:
            raise UnsupportedConfigError(why)


def is_quantized_path(path: str, ndim: int) -> bool:
    """Linear kernels (2-D `.kernel` leaves) are quantized; embeddings, norms and biases are not."""
    return path.endswith(".kernel") and ndim == 2


class Quantizer:
    """Quantizes one engine's placed weights: `quantize_placed` for each leaf of a load or a
    sync, `quantize_derived` for the runner's serving-only copies, `tree` for a dummy init."""

    def __init__(self, kind: str, model_def: ModelDef, shardings: Mapping[str, NamedSharding]):
        self.kind = kind
        self.dtype = model_def.dtype
        self.shardings = dict(shardings)
        self.paths = frozenset(leaf.path for leaf in model_def.spec.leaves if is_quantized_path(leaf.path, len(leaf.shape)))
        self._jitted: dict[tuple[tuple[int, ...], Any], Callable[[jax.Array], QuantizedKernel]] = {}

    def _quantize(self, array: jax.Array) -> QuantizedKernel:
        """One placed (in, out) kernel -> QuantizedKernel on the same devices; the float array
        is left to the caller."""
        sharding: Any = array.sharding  # a NamedSharding where the runner placed it
        key = (tuple(array.shape), sharding)
        fn = self._jitted.get(key)
        if fn is None:
            d_in, d_out = array.shape
            device: Any = next(iter(sharding.device_set))  # jaxlib's Device class ships no type stubs
            cols = chunk_cols(d_in, d_out, device.platform)
            out_shardings: Any = None
            if isinstance(sharding, NamedSharding):
                mesh = sharding.mesh
                spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
                in_axis, out_axis = spec[0], spec[1]
                # columns split as the kernel's out axis, inside each chunk (the scan over
                # chunks then never slices across devices); rows as its in axis
                split_cols = out_axis if out_axis is not None and cols % mesh.size == 0 else None
                out_shardings = QuantizedKernel(
                    NamedSharding(mesh, PartitionSpec(None, in_axis, split_cols)),  # type: ignore[arg-type]
                    NamedSharding(mesh, PartitionSpec()),  # type: ignore[arg-type]  # (out,) scales: replicated
                )
            fn = jax.jit(lambda w, c=cols: quantize(w, self.kind, c, self.dtype), out_shardings=out_shardings)
            self._jitted[key] = fn
        return fn(array)

    def quantize_placed(self, path: str, placed: jax.Array) -> Any:
        """A leaf the runner placed (a load's or a sync's), quantized if its path is; the
        full-precision copy is dropped at once (one kernel at a time, never the whole tree)."""
        if path not in self.paths:
            return placed
        quantized = jax.block_until_ready(self._quantize(placed))
        placed.delete()
        return quantized

    def tree(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Placed full-precision parameters (a dummy init) -> the quantized tree."""
        return {path: self._quantize(a) if path in self.paths else a for path, a in params.items()}

    def quantize_derived(self, derived: Mapping[str, Any]) -> dict[str, Any]:
        """The runner's derived leaves with its head copy (`head_t`, (hidden, vocab)) quantized."""
        out = dict(derived)
        if "head_t" in out:
            head = out["head_t"]
            out["head_t"] = jax.block_until_ready(self._quantize(head))
            head.delete()
        return out


def weight_bytes(params: Mapping[str, Any], derived: Mapping[str, Any] | None = None) -> int:
    """Bytes of the serving weights (quantized kernels: values + scales) and derived copies."""
    leaves = jax.tree_util.tree_leaves([dict(params), dict(derived or {})])
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)
