"""Paged attention kernels: page writes and gathers, the XLA path against the contiguous decode
attention, and the Pallas TPU kernel (in Pallas' TPU interpret mode on the CPU) against the
XLA path, on 1 device and sharded over 4 (by KV heads, or replicated when they do not divide)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rollout.engine.native.kv.paged import attention
from rollout.models import forward as model_forward
from rollout.models.sharding import make_mesh

PAGE = 4


def random_case(seed: int, batch: int, heads: int, kv_heads: int, head_dim: int, num_pages: int, width: int):
    """Random bfloat16-representable q and pages (the Pallas kernel reads K/V in bfloat16),
    scrambled page tables (no page in two rows) and lengths ending mid-page."""
    rng = np.random.default_rng(seed)

    def bf16_exact(shape):
        return np.asarray(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16).astype(jnp.float32))

    q = bf16_exact((batch, heads, head_dim))
    k = bf16_exact((kv_heads, num_pages, PAGE, head_dim))
    v = bf16_exact((kv_heads, num_pages, PAGE, head_dim))
    order = rng.permutation(num_pages)[: batch * width].reshape(batch, width).astype(np.int32)
    lengths = rng.integers(1, width * PAGE + 1, batch).astype(np.int32)
    lengths[0] = width * PAGE - 1  # one row spans all its pages
    return q, k, v, order, lengths


def contiguous(pages: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(B, KVH, width * PAGE, D): each row's positions in order, read with numpy."""
    kvh, _, _, d = pages.shape
    return pages[:, table].reshape(kvh, table.shape[0], -1, d).transpose(1, 0, 2, 3)


def test_written_positions_read_back_in_order_and_padding_writes_are_dropped():
    pages = jnp.zeros((2, 6, PAGE, 3), jnp.float32)
    table = np.array([[4, 1], [0, 5]], np.int32)
    values = np.arange(2 * 8 * 2 * 3, dtype=np.float32).reshape(2, 8, 2, 3) + 1  # (B, T, KVH, D)
    page_ids = table[:, np.arange(8) // PAGE]
    page_ids[1, 5:] = 6  # out of range: dropped
    out = attention.write(pages, values, page_ids, np.broadcast_to(np.arange(8) % PAGE, (2, 8)))
    rows = np.asarray(attention.gather(out, table))  # (B, KVH, 8, D)
    assert np.array_equal(rows[0], values[0].transpose(1, 0, 2))
    assert np.array_equal(rows[1, :, :5], values[1, :5].transpose(1, 0, 2))
    assert not rows[1, :, 5:].any()
    assert not np.asarray(out)[:, [2, 3]].any()  # pages outside both tables untouched


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (4, 2, 32), (8, 2, 24)])
def test_xla_paged_decode_attention_equals_the_contiguous_decode_attention(heads, kv_heads, head_dim):
    q, k, v, table, lengths = random_case(0, 3, heads, kv_heads, head_dim, num_pages=16, width=4)
    mask = (np.arange(4 * PAGE)[None, :] < lengths[:, None])[:, None, :]
    want = model_forward.decode_attention(q[:, None], contiguous(k, table), contiguous(v, table), mask)[:, 0]
    got = attention.decode_attention_xla(q, k, v, table, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim", [(4, 4, 32), (4, 2, 32), (8, 2, 16), (16, 2, 128)], ids=lambda x: str(x)
)
def test_pallas_paged_attention_in_interpret_mode_equals_the_xla_path(heads, kv_heads, head_dim):
    q, k, v, table, lengths = random_case(1, 3, heads, kv_heads, head_dim, num_pages=16, width=4)
    want = attention.decode_attention_xla(q, k, v, table, lengths)
    got = jax.jit(lambda *a: attention.decode_attention_pallas(*a, interpret=True))(q, k, v, table, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["kv-sharded", "kv-replicated"])
def test_pallas_paged_attention_on_4_devices_equals_the_xla_path(kv_heads):
    mesh = make_mesh(jax.devices()[:4])
    q, k, v, table, lengths = random_case(2, 2, 8, kv_heads, 32, num_pages=12, width=2)
    spec = PartitionSpec("tp") if kv_heads % 4 == 0 else PartitionSpec()
    k_s, v_s = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (k, v))
    q_s = jax.device_put(q, NamedSharding(mesh, PartitionSpec(None, "tp")))
    want = attention.decode_attention_xla(q, k, v, table, lengths)
    got = jax.jit(lambda *a: attention.decode_attention_pallas(*a, mesh=mesh, interpret=True))(
        q_s, k_s, v_s, table, lengths
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_the_pallas_kernel_is_chosen_only_on_tpu_for_bfloat16_pools():
    assert attention.choose_kernel("tpu", jnp.bfloat16) == "pallas"
    assert attention.choose_kernel("tpu", jnp.float32) == "xla"
    assert attention.choose_kernel("cpu", jnp.bfloat16) == "xla"
