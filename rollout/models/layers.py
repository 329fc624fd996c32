"""Building blocks a model family assembles its decoder from: RMSNorm, Linear, RoPE.

Every parameter is declared once, where it is made, with its shape, dtype, initializer and
logical axes (`nnx.Param(value, axes=...)`); `rollout.models.sharding` derives its sharding from them.
Norms and RoPE compute in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rollout.models import invariant
from rollout.models.quant import QuantizedKernel
from rollout.models.quant import matmul as quantized_matmul

Array = jax.Array


def matmul(x: Array, w: Array | QuantizedKernel) -> Array:
    """x (..., in) @ w (in, out): every Linear's product, in one place (batch-invariant mode
    swaps in `rollout.models.invariant.matmul`; a quantized kernel multiplies as
    `rollout.models.quant.matmul`)."""
    if isinstance(w, QuantizedKernel):
        return quantized_matmul(x, w)
    return invariant.matmul(x, w) if invariant.active() else x @ w


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, axis: str = "embed"):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=(axis,))  # (dim,)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        if invariant.active():  # the mean over a row, on fixed-shape row tiles
            return invariant.rowwise(self._normalize, x)
        return self._normalize(x)

    def _normalize(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); `axes` are the logical axes of (in, out). The engine may hold a
    quantized kernel here (rollout.models.quant.QuantizedKernel): `matmul` multiplies either."""

    def __init__(
        self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype), axes=axes)  # (in, out)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype), axes=axes[1:]) if bias else None  # (out,)

    def __call__(self, x: Array) -> Array:
        y = matmul(x, self.kernel.get_value())
        return y + self.bias[...] if self.bias is not None else y


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, half-split layout (as HF Qwen). x (B, T, N, D), positions (B, T)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # (D/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, D/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
