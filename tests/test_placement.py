"""Placement on devices: the device array owns its memory, whatever the source's alignment."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from rollout.engine.placement import owned_copy, place  # noqa: E402


def _aligned(shape, dtype=np.float32, offset=0):
    """An array whose data starts `offset` bytes past a 64-byte boundary (plasma buckets: 0)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    out = raw[start : start + nbytes].view(dtype).reshape(shape)
    out[...] = np.arange(out.size, dtype=dtype).reshape(shape)
    return out


def _shardings():
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    return {
        "one device": jax.sharding.SingleDeviceSharding(jax.devices()[0]),
        "replicated": NamedSharding(mesh, P()),
        "rows": NamedSharding(mesh, P("tp", None)),
        "columns": NamedSharding(mesh, P(None, "tp")),
    }


@pytest.mark.parametrize("offset", [0, 16], ids=["64-byte aligned", "16 past"])
@pytest.mark.parametrize("kind", ["one device", "replicated", "rows", "columns"])
def test_a_placed_array_does_not_change_when_its_source_is_mutated(kind, offset):
    source = _aligned((64, 32), offset=offset)
    expected = source.copy()
    placed = place(source, _shardings()[kind]).block_until_ready()
    source[...] = -1.0
    np.testing.assert_array_equal(np.asarray(placed), expected)
    assert placed.sharding == _shardings()[kind]


def test_an_owned_copy_is_aligned_contiguous_and_equal():
    source = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    copy = owned_copy(source)
    assert copy.ctypes.data % 64 == 0 and copy.flags.c_contiguous
    np.testing.assert_array_equal(copy, source)
