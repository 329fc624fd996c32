"""Paged KV cache: a pool of fixed-size pages shared by sequences through page tables.

- `pool`: host-side bookkeeping (page tables, reference counts, sharing, counters); no jax.
- `prefix_cache`: full prompt pages kept across requests, found by their tokens (a chain of
  pages), evicted least recently used when idle, dropped at every weight swap; no jax.
- `memory`: bytes per page and pool sizing (pages, or a fraction of device memory on TPU).
- `attention`: paged attention kernels (XLA gather on CPU, Pallas on TPU) and page writes.
- `forward`: the Qwen prefill and decode forwards over a page pool.
- `runner`: jitted paged prefill and multi-step decode taking parameters as arguments.

Importing this package does not import jax.
"""
