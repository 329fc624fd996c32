"""Paged attention kernels and page writes.

Layout (per layer, K and V alike): pages (kv_heads, num_pages, page_size, head_dim), head-major
as the contiguous cache, so the pool is sharded by KV heads exactly like it (`pool_sharding`),
and it is the layout of JAX's Pallas TPU paged-attention kernel. A sequence's positions live in
the pages its page-table row lists, in order.

Two decode attentions, the same math (the contiguous path's `rollout.models.forward.decode_attention`):

- `decode_attention_xla`: gathers each row's pages into a (B, KVH, pages x page_size, D) block
  and runs the fused multiply-reduce attention; any platform, any dtype. The CPU path.
- `decode_attention_pallas`: `jax.experimental.pallas.ops.tpu.paged_attention`, which reads the
  pages in place with double-buffered DMAs. The kernel computes with K and V in bfloat16, so it
  is the TPU path for bfloat16 pools (`choose_kernel`); on a mesh it runs under `shard_map`, one
  kernel per device on its KV heads. `interpret=True` runs it in Pallas' TPU interpret mode on
  the CPU (tests compare it with the XLA path there).

Writes (`write`) scatter new K/V positions into pages; a page id out of range (`num_pages`)
drops the write, which is how padding rows and positions are discarded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rollout.models import forward as model_forward
from rollout.models.config import ModelConfig
from rollout.models.sharding import TP, logical_rules, to_spec

Array = jax.Array
# (k_pages, v_pages) per layer, each (kv_heads, num_pages, page_size, head_dim)
PagedKV = tuple[tuple[Array, Array], ...]
PAGE_AXES: tuple[str | None, ...] = ("kv_heads", None, None, None)
KERNELS = ("xla", "pallas")


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    return (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)


def pool_sharding(mesh: Mesh, cfg: ModelConfig) -> NamedSharding:
    """By KV heads when they divide over the devices, else replicated (as the contiguous cache)."""
    return NamedSharding(mesh, to_spec(PAGE_AXES, logical_rules(cfg, mesh.size)))


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding: NamedSharding) -> PagedKV:
    """Zeroed pages for every layer, made on the devices with `sharding` (no host copy)."""
    shape = pool_shape(cfg, num_pages, page_size)
    make = jax.jit(
        lambda: tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)),
        out_shardings=tuple((sharding, sharding) for _ in range(cfg.num_layers)),
    )
    return make()


def choose_kernel(platform: str, dtype) -> str:
    """"pallas" on TPU for bfloat16 pools (the kernel computes in bfloat16), else "xla"."""
    return "pallas" if platform == "tpu" and jnp.dtype(dtype) == jnp.bfloat16 else "xla"


def write(pages: Array, values: Array, page_ids: Array, offsets: Array) -> Array:
    """Scatter values (..., KVH, D) into pages (KVH, N, S, D) at (page_ids, offsets) (...).

    Page ids >= N are dropped (padding)."""
    values = jnp.moveaxis(values, -2, 0).astype(pages.dtype)  # (KVH, ..., D)
    return jnp.asarray(pages).at[:, page_ids, offsets].set(values, mode="drop")


def gather(pages: Array, page_table: Array) -> Array:
    """pages (KVH, N, S, D), page_table (B, n) -> (B, KVH, n * S, D): each row's positions in order."""
    kvh, _, s, d = pages.shape
    b, n = page_table.shape
    rows = jnp.asarray(pages).at[:, page_table].get(mode="clip")  # (KVH, B, n, S, D)
    return rows.reshape(kvh, b, n * s, d).transpose(1, 0, 2, 3)


def decode_attention_xla(q: Array, k_pages: Array, v_pages: Array, page_table: Array, lengths: Array) -> Array:
    """q (B, H, D) attends to positions [0, lengths[b]) of row b's pages -> (B, H, D).

    page_table (B, n): only its first n pages are read, so callers pass a span bucket."""
    k = gather(k_pages, page_table)
    v = gather(v_pages, page_table)
    mask = (jnp.arange(k.shape[2])[None, :] < lengths[:, None])[:, None, :]  # (B, 1, n * S)
    return model_forward.decode_attention(q[:, None], k, v, mask)[:, 0]


def decode_attention_pallas(
    q: Array,
    k_pages: Array,
    v_pages: Array,
    page_table: Array,
    lengths: Array,
    *,
    mesh: Mesh | None = None,
    pages_per_block: int | None = None,
    interpret: bool = False,
) -> Array:
    """`decode_attention_xla` by the Pallas TPU paged-attention kernel (K/V in bfloat16).

    Rows of length 0 are skipped by the kernel (their output is undefined): padding rows must
    carry a length >= 1. `pages_per_block` must divide page_table's width (default: the largest
    power of two <= 8 that does). On a mesh whose device count divides the KV heads, each device
    runs the kernel on its heads; otherwise every device runs it on all heads.
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    width = page_table.shape[1]
    block = pages_per_block or next(b for b in (8, 4, 2, 1) if width % b == 0)
    scale = q.shape[-1] ** -0.5
    # the kernel does not scale: fold 1/sqrt(D) into q in float32 (as the XLA path scales scores)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    kernel = functools.partial(paged_attention, pages_per_compute_block=block)

    def run(q, k, v, lengths, table):
        if interpret:
            with pltpu.force_tpu_interpret_mode():
                return kernel(q, k, v, lengths, table)
        return kernel(q, k, v, lengths, table)

    lengths = lengths.astype(jnp.int32)
    page_table = page_table.astype(jnp.int32)
    if mesh is None or mesh.size == 1:
        return run(q, k_pages, v_pages, lengths, page_table)
    heads = PartitionSpec(None, TP) if k_pages.shape[0] % mesh.size == 0 else PartitionSpec()
    pages = PartitionSpec(TP) if k_pages.shape[0] % mesh.size == 0 else PartitionSpec()
    sharded = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(heads, pages, pages, PartitionSpec(), PartitionSpec()),
        out_specs=heads,
        check_vma=False,
    )
    return sharded(q, k_pages, v_pages, lengths, page_table)
