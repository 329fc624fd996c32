"""Batch-invariant kernels: a row's numbers never depend on what else is computed beside it.

Why the default forwards are not invariant: XLA:CPU picks its matmul kernel and blocking from
the operand shapes (a one-row product runs as a matrix-vector kernel, a (8, 768) one as a GEMM
with another accumulation order), so the same row gives different low bits alone, among 7
others, in a prefill of 300 positions or in a decode step: up to ~3e-5 in the logprobs of the
tiny test model. Attention reduces over a span (prefill bucket, decode span, scoring length)
that also changes with the batch.

The mode (`enabled`, a trace-time switch the engine's jitted functions and
`rollout.models.token_logprobs` set) swaps in fixed-shape kernels, and nothing else changes:

- `matmul` (every Linear and the output head): x is flattened to rows, padded to a multiple
  of `ROW_TILE`, and ONE fixed-shape product (ROW_TILE, in) x (in, out) runs per tile in a
  `lax.map`. Every row, whatever the batch, goes through the same compiled kernel with the same
  shapes, so its accumulation order over `in` is fixed, and its result depends on its own
  values only (checked per position in a tile and per number of tiles in
  tests/test_batch_invariant.py).
- `rowwise` / `row_sum`: the same row tiling for the reductions over a row: RMSNorm's mean
  (layers.RMSNorm) and the log-softmax's sum over the vocabulary (the sampler's logprob and
  scoring's, `rollout.models.logprobs.logprobs_of`). Measured: a plain mean over (rows, 64) or
  sum over (rows, 512) changes its low bits with the number of rows on XLA:CPU.
- `attention`: each query (QUERY_TILE = 1 at a time, in a `lax.map`, with its own row's keys)
  is reduced over its keys in blocks of `KV_BLOCK` absolute positions, in order, with an online
  softmax (running max, sum and weighted values, float32). Keys are indexed by absolute position
  in every path (a prefill's fresh K/V, the contiguous cache, the paged layout's gathered block,
  a scoring row), so block j always holds the same keys. A block the query may not see at all
  (past its position, or padding of a longer span) changes nothing bit for bit: its scores are
  masked to -1e30, so the running max stays, the rescale factor is exp(0) = 1 exactly and it
  adds exact zeros. So prefill, decode and full-sequence scoring give a position the same
  numbers whatever the span bucket, the number of queries or rows.

RoPE, the activations and residual adds are elementwise (per element, the same at any shape);
max is exact in any order. The output head in this mode is `matmul` against the embedding's
transpose made inside the jitted function (never the serving-only transposed copy), so the
engine and a trainer that has only the parameters run the same product. The sampler's draw is
already per row (keys from seed, sample index and position).

Not covered: a different device count (tensor-parallel products reduce across devices in
another order), dtype, platform, or XLA/JAX version; MoE models (the grouped expert matmul
groups rows by expert: refused, see `check_supported`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from rollout.models.config import ModelConfig

Array = jax.Array
ROW_TILE = 8  # rows per fixed-shape product: small, since a lone decode row pays for the whole tile
KV_BLOCK = 64  # key positions per attention block: the span buckets' floor, so no bucket pads
QUERY_TILE = 1  # queries per attention tile: a decode step has one query per row
_MASKED = -1e30

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("batch_invariant", default=False)
F = TypeVar("F", bound=Callable[..., Any])


class BatchInvariantUnsupportedError(ValueError):
    """batch_invariant=True asked of a model or backend that cannot give it."""


def active() -> bool:
    """Whether the code being traced now runs in batch-invariant mode."""
    return _ENABLED.get()


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Trace the enclosed model code in batch-invariant mode (when `on`)."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def traced(fn: F, on: bool) -> F:
    """`fn` traced in batch-invariant mode when `on` (for the bodies of jitted functions)."""
    if not on:
        return fn

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with enabled():
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]  # jax.jit reads static_argnames from it
    wrapper.__name__ = getattr(fn, "__name__", "invariant")
    return wrapper  # type: ignore[return-value]


def check_supported(cfg: ModelConfig) -> None:
    """Raise BatchInvariantUnsupportedError for models this mode does not cover (MoE)."""
    if cfg.num_experts:
        raise BatchInvariantUnsupportedError(
            f"batch_invariant=True is not supported for mixture-of-experts models ({cfg.architecture}): "
            "the grouped expert matmul tiles rows by expert, so a token's numbers depend on which other "
            "tokens chose the same expert. Serve a dense model, or turn batch_invariant off."
        )


def matmul(x: Array, w: Array) -> Array:
    """x (..., in) @ w (in, out) -> (..., out), one fixed-shape product per ROW_TILE rows."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d_in)
    n = rows.shape[0]
    tiles = -(-max(n, 1) // ROW_TILE)
    rows = jnp.pad(rows, ((0, tiles * ROW_TILE - n), (0, 0))).reshape(tiles, ROW_TILE, d_in)
    out = jax.lax.map(lambda tile: tile @ w, rows)  # (tiles, ROW_TILE, out)
    return out.reshape(tiles * ROW_TILE, -1)[:n].reshape(*lead, w.shape[-1])


def rowwise(fn: Callable[[Array], Array], x: Array, tile: int = ROW_TILE) -> Array:
    """fn over the rows of x (..., d) -> (..., d_out), `tile` rows at a time in a `lax.map`, so
    `fn` always runs on the same (tile, d) shape: its reductions cannot change with the batch."""
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    n = rows.shape[0]
    tiles = -(-max(n, 1) // tile)
    rows = jnp.pad(rows, ((0, tiles * tile - n), (0, 0))).reshape(tiles, tile, d)
    out = jax.lax.map(fn, rows)  # (tiles, tile, d_out)
    return out.reshape(tiles * tile, -1)[:n].reshape(*lead, out.shape[-1])


def row_sum(x: Array) -> Array:
    """x (..., n) summed over its last axis; in batch-invariant mode on fixed-shape row tiles
    (a plain sum over a (rows, vocab) block changes its order with the number of rows)."""
    if not active():
        return jnp.sum(x, axis=-1)
    return rowwise(lambda t: jnp.sum(t, axis=-1, keepdims=True), x)[..., 0]


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """`rollout.models.forward.attention` with a fixed reduction order per query.

    q (B, T, H, D); k, v (B, KVH, S, D) head-major; mask (B, T, S) True where a query may
    attend; key s is absolute position s. Every query must see key 0 (causal attention always
    does; a padding query's output is meaningless). Returns (B, T, H, D) in q's dtype.

    Queries run QUERY_TILE at a time in a `lax.map` (each with its own row's keys), and each
    tile scans its keys KV_BLOCK positions at a time: every reduction runs on one fixed shape.
    """
    b, t, h, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    blocks = -(-s // KV_BLOCK)
    pad = blocks * KV_BLOCK - s
    if pad:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
    kb = k.reshape(b, kvh, blocks, KV_BLOCK, d).transpose(0, 2, 1, 3, 4)  # (B, blocks, KVH, KB, D)
    vb = v.reshape(b, kvh, blocks, KV_BLOCK, d).transpose(0, 2, 1, 3, 4)
    n = b * t
    tiles = -(-n // QUERY_TILE)
    extra = tiles * QUERY_TILE - n
    qs = jnp.pad(q.reshape(n, kvh, g, d), ((0, extra), (0, 0), (0, 0), (0, 0)))
    ms = jnp.pad(mask.reshape(n, blocks, KV_BLOCK), ((0, extra), (0, 0), (0, 0)))
    rows = jnp.pad(jnp.repeat(jnp.arange(b, dtype=jnp.int32), t), (0, extra))  # each query's batch row
    tile_of = (tiles, QUERY_TILE)

    def one_tile(args: tuple[Array, Array, Array]) -> Array:
        qt, mt, rt = args  # (QT, KVH, G, D), (QT, blocks, KB), (QT,)
        qt = qt.astype(jnp.float32) * (d**-0.5)

        def step(carry: tuple[Array, Array, Array], j: Array):
            m, total, acc = carry  # (QT, KVH, G), (QT, KVH, G), (QT, KVH, G, D)
            kj = kb[rt, j].astype(jnp.float32)  # (QT, KVH, KB, D)
            vj = vb[rt, j].astype(jnp.float32)
            scores = jnp.sum(qt[:, :, :, None, :] * kj[:, :, None], axis=-1)  # (QT, KVH, G, KB)
            scores = jnp.where(mt[:, j][:, None, None, :], scores, _MASKED)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            p = jnp.exp(scores - m_new[..., None])
            scale = jnp.exp(m - m_new)
            total = total * scale + jnp.sum(p, axis=-1)
            pv = jnp.sum(p[..., None] * vj[:, :, None], axis=-2)  # (QT, KVH, G, D)
            return (m_new, total, acc * scale[..., None] + pv), None

        init = (
            jnp.full((QUERY_TILE, kvh, g), -jnp.inf, jnp.float32),
            jnp.zeros((QUERY_TILE, kvh, g), jnp.float32),
            jnp.zeros((QUERY_TILE, kvh, g, d), jnp.float32),
        )
        (_, total, acc), _ = jax.lax.scan(step, init, jnp.arange(blocks))
        return acc / total[..., None]

    out = jax.lax.map(
        one_tile, (qs.reshape(*tile_of, kvh, g, d), ms.reshape(*tile_of, blocks, KV_BLOCK), rows.reshape(tile_of))
    )
    return out.reshape(tiles * QUERY_TILE, h, d)[:n].reshape(b, t, h, d).astype(q.dtype)
