"""The Qwen prefill and decode forwards over a page pool (see `attention` for the layout).

Same model, same math as `rollout.models.forward.prefill` / `decode`; only where K/V live differs.
Both run the family model's `hidden` with an `attend` callback that writes the new positions into
pages and attends:

- `prefill`: right-padded prompts attend to their own fresh K/V (as the contiguous prefill);
  row b's positions are written to the pages `write_pages[b]` names. The n samples of a prompt
  share its full pages, so only one of them (the group's first) writes them; every other
  sample's private copy of the partial last page is filled by a tail write (`tail_*`): the
  prompt's positions [start, start + page_size) of row src, into one page.
- `prefill_cached`: the same for prompts whose leading pages are cached (a prefix cache hit):
  only the rest runs, its queries attending over the row's pages (cached and new K/V).
- `decode`: one token per row; the new K/V go to (page_table[b, pos // S], pos % S), then the
  row attends over the first `span` pages of its table (a static bucket), by the XLA gather
  kernel or the Pallas one. The Pallas path runs this every step (the kernel reads pages in
  place).
- `gather_rows` / `write_rows`: the XLA path of a multi-step decode call. The pages of every
  row are gathered once per call into a dense working block (B, KVH, span x S, D) per layer,
  the call's steps run on that block exactly as the contiguous decode runs on its cache
  (`rollout.models.forward.decode`, in place), and the call's new positions are scattered into
  the pages once at the end. Gathering every step instead copied every row's whole span per
  layer, K and V, per step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rollout.engine.native.kv.paged import attention
from rollout.engine.native.kv.paged.attention import PagedKV
from rollout.models import forward as model_forward
from rollout.models.moe import RouteFn

Array = jax.Array


class _TailCopies(NamedTuple):
    """Where a prefill writes each row's partial last page for the samples that copy it:
    (J, S) source positions (clipped into the bucket), target pages (out of range past the
    row's length: not written) and offsets."""

    src: Array
    pos: Array
    pages: Array
    offsets: Array

    @staticmethod
    def of(src: Array, start: Array, page: Array, lengths: Array, page_size: int, num_pages: int, p: int) -> _TailCopies:
        pos = start[:, None] + jnp.arange(page_size)[None, :]
        pages = jnp.where(pos < lengths[src][:, None], page[:, None], num_pages)
        offsets = jnp.broadcast_to(jnp.arange(page_size)[None, :], pos.shape)
        return _TailCopies(src, jnp.minimum(pos, p - 1), pages, offsets)

    def write(self, pages: Array, x: Array, write_pages: Array, offsets: Array) -> Array:
        """x (B, P, KVH, D) new K or V: every position into its page, then the tail copies."""
        pages = attention.write(pages, x, write_pages, offsets)
        return attention.write(pages, x[self.src[:, None], self.pos], self.pages, self.offsets)


def prefill(
    model: model_forward.CausalLM,
    pool: PagedKV,
    tokens: Array,
    lengths: Array,
    write_pages: Array,
    tail_src: Array,
    tail_start: Array,
    tail_page: Array,
    head_t: Array | None = None,
    route: RouteFn | None = None,
) -> tuple[Array, PagedKV]:
    """Run right-padded prompts and write their K/V into pages.

    tokens (B, P) right-padded; lengths (B,) (0 for padding rows). write_pages (B, P): the page
    of each position (num_pages, i.e. out of range, for positions not to write: padding, and
    shared pages another row writes). tail_src, tail_start, tail_page (J,): copy positions
    [tail_start, tail_start + page_size) of prompt row tail_src into page tail_page (out of
    range: no copy); positions at or past the row's length are not written. `route`: see
    `CausalLM.hidden`. Returns float32 logits at each prompt's last real token (B, vocab) and
    the new pool.
    """
    b, p = tokens.shape
    page_size = pool[0][0].shape[2]
    num_pages = pool[0][0].shape[1]
    real = jnp.arange(p)[None, :] < lengths[:, None]
    mask = model_forward.causal_padding_mask(real)
    positions = jnp.broadcast_to(jnp.arange(p)[None, :], (b, p))
    offsets = jnp.broadcast_to(jnp.arange(p)[None, :] % page_size, (b, p))
    tails = _TailCopies.of(tail_src, tail_start, tail_page, lengths, page_size, num_pages, p)
    new_pool = list(pool)

    def attend(i: int, q: Array, k: Array, v: Array) -> Array:
        kp, vp = new_pool[i]
        new_pool[i] = (tails.write(kp, k, write_pages, offsets), tails.write(vp, v, write_pages, offsets))
        return model_forward.attention(q, model_forward.head_major(k), model_forward.head_major(v), mask)

    h = model.hidden(tokens, positions, attend, route)
    last = h[jnp.arange(b), jnp.maximum(lengths - 1, 0)]
    return model.logits(last, head_t), tuple(new_pool)


def prefill_cached(
    model: model_forward.CausalLM,
    pool: PagedKV,
    tokens: Array,
    starts: Array,
    lengths: Array,
    write_pages: Array,
    tail_src: Array,
    tail_start: Array,
    tail_page: Array,
    page_table: Array,
    head_t: Array | None = None,
    route: RouteFn | None = None,
) -> tuple[Array, PagedKV]:
    """`prefill` of prompts whose first `starts[b]` positions are already in row b's pages (a
    prefix cache hit; a multiple of page_size): only the rest is run.

    tokens (B, P) right-padded: each row's positions [starts[b], starts[b] + lengths[b]);
    write_pages, tail_* as in `prefill`, positions counted from starts[b] (tail_start too).
    page_table (B, span): each row's first `span` pages (unused: num_pages), covering its cached
    and new positions. Each layer writes the new K/V into the pages first, then the queries
    attend over the row's pages gathered (cached and new positions together; the rest masked).
    Returns float32 logits at each row's last token (B, vocab) and the new pool.
    """
    b, p = tokens.shape
    page_size = pool[0][0].shape[2]
    num_pages = pool[0][0].shape[1]
    rel = jnp.arange(p)[None, :]
    positions = starts[:, None] + rel  # (B, P) absolute positions
    offsets = jnp.broadcast_to(rel % page_size, (b, p))  # starts are whole pages
    keys = jnp.arange(page_table.shape[1] * page_size)[None, None, :]  # (1, 1, span x S)
    mask = (keys <= positions[:, :, None]) & (keys < (starts + lengths)[:, None, None])  # (B, P, span x S)
    tails = _TailCopies.of(tail_src, tail_start, tail_page, lengths, page_size, num_pages, p)
    table = jnp.minimum(page_table, num_pages - 1)
    new_pool = list(pool)

    def attend(i: int, q: Array, k: Array, v: Array) -> Array:
        kp, vp = new_pool[i]
        kp, vp = new_pool[i] = (tails.write(kp, k, write_pages, offsets), tails.write(vp, v, write_pages, offsets))
        return model_forward.attention(q, attention.gather(kp, table), attention.gather(vp, table), mask)

    h = model.hidden(tokens, positions, attend, route)
    last = h[jnp.arange(b), jnp.maximum(lengths - 1, 0)]
    return model.logits(last, head_t), tuple(new_pool)


def decode(
    model: model_forward.CausalLM,
    pool: PagedKV,
    page_table: Array,
    tokens: Array,
    positions: Array,
    span: int,
    head_t: Array | None = None,
    *,
    kernel: str = "xla",
    mesh: Mesh | None = None,
    interpret: bool = False,
    route: RouteFn | None = None,
) -> tuple[Array, PagedKV]:
    """One step for a batch of sequences (`route`: see `CausalLM.hidden`).

    page_table (B, W): each row's pages, unused entries num_pages (out of range); tokens,
    positions (B,): the token each row feeds and its position. A write to an unused entry is
    dropped: padding rows (all entries unused) and steps past a row's pages, whose outputs are
    meaningless. Attention covers the first `span` (static) pages of each row, which must hold
    every position + 1; unused entries are read as the last page and masked.
    `kernel`: "xla" or "pallas" (`interpret` runs Pallas in TPU interpret mode).
    Returns float32 logits (B, vocab) and the new pool.
    """
    num_pages, page_size = pool[0][0].shape[1:3]
    width = page_table.shape[1]
    real = positions < width * page_size
    slot = jnp.minimum(positions // page_size, width - 1)
    page = jnp.where(real, jnp.take_along_axis(page_table, slot[:, None], axis=1)[:, 0], num_pages)
    offset = positions % page_size
    lengths = jnp.where(real, positions + 1, 1)  # padding rows read one (masked) position
    # Reads stay inside the pool (the Pallas kernel DMAs every page below a row's length).
    table = jnp.minimum(page_table[:, :span], num_pages - 1)
    new_pool = list(pool)

    def attend(i: int, q: Array, k: Array, v: Array) -> Array:
        kp, vp = new_pool[i]
        kp = attention.write(kp, k[:, 0], page, offset)
        vp = attention.write(vp, v[:, 0], page, offset)
        new_pool[i] = (kp, vp)
        if kernel == "pallas":
            out = attention.decode_attention_pallas(q[:, 0], kp, vp, table, lengths, mesh=mesh, interpret=interpret)
        else:
            out = attention.decode_attention_xla(q[:, 0], kp, vp, table, lengths)
        return out[:, None]

    h = model.hidden(tokens[:, None], positions[:, None], attend, route)
    return model.logits(h[:, 0], head_t), tuple(new_pool)


def gather_rows(pool: PagedKV, page_table: Array, span: int) -> model_forward.KVCache:
    """Each row's first `span` pages, per layer: a dense (B, KVH, span x S, D) K and V block.

    The block is laid out as the contiguous cache with one slot per row, so the contiguous
    decode (`rollout.models.forward.decode` with `in_place`) runs on it unchanged. Unused
    table entries (num_pages) read the last page; the decode's mask hides them.
    """
    table = jnp.minimum(page_table[:, :span], pool[0][0].shape[1] - 1)
    return tuple((attention.gather(kp, table), attention.gather(vp, table)) for kp, vp in pool)


def write_rows(pool: PagedKV, block: model_forward.KVCache, page_table: Array, start: Array, steps: int) -> PagedKV:
    """Scatter positions [start[b], start[b] + steps) of each row's block into its pages.

    Positions past the table's width, or on an unused entry (num_pages), are dropped: padding
    rows and steps past a row's pages write nowhere.
    """
    num_pages, page_size = pool[0][0].shape[1:3]
    b, width = page_table.shape
    pos = start[:, None] + jnp.arange(steps)[None, :]  # (B, K)
    real = pos < width * page_size
    slot = jnp.minimum(pos // page_size, width - 1)
    page = jnp.where(real, jnp.take_along_axis(page_table, slot, axis=1), num_pages)
    offset = pos % page_size
    rows = jnp.arange(b)[:, None]
    new_pool = []
    for (kp, vp), (kb, vb) in zip(pool, block):
        # (row, :, position) takes a (B, K, KVH, D) block: advanced indices first, as in numpy.
        k_new = kb.at[rows, :, pos].get(mode="clip")
        v_new = vb.at[rows, :, pos].get(mode="clip")
        new_pool.append((attention.write(kp, k_new, page, offset), attention.write(vp, v_new, page, offset)))
    return tuple(new_pool)
