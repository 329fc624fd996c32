"""Copying host arrays onto devices so that the device array owns its memory.

`jax.device_put(host, sharding, may_alias=False)` is not enough on CPU: jax 0.10 adopts a
64-byte-aligned numpy buffer as the device buffer of every device whose piece of it is
contiguous (one device, replicated, split along the first axis), whatever `may_alias` says.
Measured: mutating the source after `block_until_ready` changes the device array. A leaf in an
object-store bucket (leaves sit at 64-byte offsets) or a trainer's array would then *be* the
served weights, pinned and mutable from outside. So on CPU such a leaf is first copied once into
fresh 64-byte-aligned memory that only the device array references, and that copy is adopted
(no second copy). A piece that is not contiguous (split along a later axis) cannot be adopted:
jax copies it anyway. On TPU/GPU a device_put is a transfer into device memory.

    placed = place(host_array, sharding)   # never aliases host_array
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

_ALIGN = 64  # the CPU client adopts host buffers aligned to this


def place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """`host` on the devices of `sharding`, in memory that nothing else references."""
    host = np.asarray(host)
    device: Any = next(iter(sharding.device_set))  # jaxlib's Device class ships no type stubs
    if device.platform != "cpu":
        return jax.device_put(host, sharding)
    pieces = sharding.addressable_devices_indices_map(host.shape).values()
    if any(host[index].flags.c_contiguous for index in pieces):
        return jax.device_put(owned_copy(host), sharding, may_alias=True)
    return jax.device_put(host, sharding, may_alias=False)  # every piece is strided: copied


def owned_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `array` in fresh memory aligned to 64 bytes."""
    raw = np.empty(array.nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out
