"""PagedRunner: jitted paged prefill and multi-step decode over one device mesh.

The paged counterpart of `rollout.engine.native.runner.ModelRunner`: it owns the page pool and the
serving parameter leaves, and its jitted functions take the parameters as arguments, so new
leaves of identical shapes, dtypes and shardings reuse the compiled executables (a weight swap
compiles nothing). Shapes are fixed or bucketed: the page-table width is max_seq_len /
page_size (rounded up) for every row, prompts and prefill batches are padded to powers of two,
decode batches to powers of two or 1.5x them up to max_batch (`batch_bucket`), and the
attention span to a power of two of pages. A call's span is its longest row's, so on the XLA
path a pass may decode its short rows and its long ones in two calls (`decode_groups`). Which pages a sequence holds is the caller's business (`rollout.engine.native.kv.paged.pool.PagePool`):
the runner takes page tables and trusts them.

A decode call runs `decode_steps` steps. With the XLA kernel (CPU, float32 pools) it gathers
every row's span of pages once into a dense block, runs the steps on it as the contiguous runner
runs a full batch on its cache, and writes the call's new positions into the pages at the end
(`forward.gather_rows` / `write_rows`): the block is scratch of rows x span positions per layer,
K and V, for the call. A call whose block would exceed `block_budget_bytes` (default: the pool's
own bytes) gathers per step and layer instead, so the scratch never outgrows the pool. With the
Pallas kernel (TPU) every step reads the pages in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rollout.engine import placement
from rollout.engine.native.jit_cache import compiled_executables
from rollout.engine.native.kv.paged import attention, forward
from rollout.engine.native.kv.paged.pool import pages_for
from rollout.engine.native.runner import alternatives_to_host, pow2_at_least
from rollout.engine.native.sampling import SlotSampling, call_steps, sample_top
from rollout.models import forward as model_forward
from rollout.models import invariant
from rollout.models.bind import ModelDef
from rollout.models.moe import RouteRecorder
from rollout.models.sharding import cache_sharding, logical_sharding

Params = dict[str, jax.Array]
Derived = dict[str, jax.Array]


def batch_bucket(n: int) -> int:
    """The smallest power of two or 1.5x a power of two that is >= n.

    >>> [batch_bucket(n) for n in (1, 2, 3, 5, 7, 13, 17, 33, 65, 97)]
    [1, 2, 3, 6, 8, 16, 24, 48, 96, 128]
    """
    p = pow2_at_least(n)
    return p * 3 // 4 if p >= 4 and p * 3 // 4 >= n else p


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """Host arrays of one paged prefill (see `forward.prefill`)."""

    tokens: np.ndarray  # (B, P) right-padded prompts (from each row's start), B a power of two
    lengths: np.ndarray  # (B,) positions to run per row
    write_pages: np.ndarray  # (B, P) page of each position; num_pages: not written
    tails: tuple[np.ndarray, np.ndarray, np.ndarray]  # (src row, start position, page), (max_batch,) each
    src_rows: np.ndarray  # (max_batch,) prompt row of each destination, in group order
    starts: np.ndarray  # (B,) positions already in the row's pages (prefix cache hits); 0: none


def plan_prefill(
    prompts: list[list[int]], groups: list[list[list[int]]], *, page_size: int, num_pages: int, max_batch: int,
    bucket: int, starts: list[int] | None = None,
) -> PrefillPlan:
    """Where each prompt position goes: the group's first table writes all positions; every
    other sample of the group gets only its private copy of the partial last page (a tail
    copy), since it shares the full pages. `starts[r]`: prompt r's leading positions already in
    its pages (whole pages, a prefix cache hit): its row runs only the rest. `bucket`: the
    padded length P of the rows run."""
    dests = sum(len(g) for g in groups)
    if dests > max_batch:
        raise ValueError(f"{dests} destinations in one prefill; at most max_batch={max_batch}")
    s = page_size
    b = pow2_at_least(len(prompts))
    tokens = np.zeros((b, bucket), np.int32)
    lengths = np.zeros((b,), np.int32)
    write_pages = np.full((b, bucket), num_pages, np.int32)
    tail_src = np.zeros((max_batch,), np.int32)
    tail_start = np.zeros((max_batch,), np.int32)
    tail_page = np.full((max_batch,), num_pages, np.int32)
    src_rows = np.zeros((max_batch,), np.int32)
    row_starts = np.zeros((b,), np.int32)
    m = j = 0
    for row, (ids, tables) in enumerate(zip(prompts, groups)):
        n = len(ids)
        start = starts[row] if starts else 0
        if start % s or not 0 <= start < n:
            raise ValueError(f"prompt {row}: start {start} must be whole pages of {s} before its {n} tokens")
        if n - start > bucket:
            raise ValueError(f"prompt {row} runs {n - start} tokens, more than the bucket of {bucket}")
        tokens[row, : n - start] = ids[start:]
        lengths[row] = n - start
        row_starts[row] = start
        full = n // s
        first = tables[0]
        if len(first) < pages_for(n, s):
            raise ValueError(f"prompt {row}: {n} tokens need {pages_for(n, s)} pages, its table has {len(first)}")
        write_pages[row, : n - start] = np.asarray(first, np.int32)[np.arange(start, n) // s]
        for table in tables[1:]:
            if list(table[:full]) != list(first[:full]):
                raise ValueError(f"prompt {row}: the samples of a group must share its full pages")
            if n % s:
                tail_src[j], tail_start[j], tail_page[j] = row, full * s - start, table[full]
                j += 1
        src_rows[m : m + len(tables)] = row
        m += len(tables)
    return PrefillPlan(tokens, lengths, write_pages, (tail_src, tail_start, tail_page), src_rows, row_starts)


class PagedRunner:
    def __init__(
        self,
        model_def: ModelDef,
        mesh: Mesh,
        *,
        max_batch: int,
        max_seq_len: int,
        decode_steps: int,
        num_pages: int,
        page_size: int,
        kernel: str = "auto",
        interpret: bool = False,
        min_prefill_len: int = 16,
        min_span_tokens: int = 64,
        block_budget_bytes: int | None = None,
        batch_invariant: bool = False,
    ):
        if kernel not in ("auto", *attention.KERNELS):
            raise ValueError(f"kernel={kernel!r}: expected 'auto', 'xla' or 'pallas'")
        self.model_def = model_def
        self.mesh = mesh
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.decode_steps = decode_steps
        self.num_pages = num_pages
        self.page_size = page_size
        self.width = pages_for(max_seq_len, page_size)  # page-table entries per sequence
        self.min_prefill_len = min_prefill_len
        self.min_span_pages = max(1, min_span_tokens // page_size)
        platform = mesh.devices.flat[0].platform
        self.kernel = attention.choose_kernel(platform, model_def.dtype) if kernel == "auto" else kernel
        if batch_invariant:  # rollout.models.invariant's attention: the XLA path only
            if kernel == "pallas":
                raise ValueError("kernel='pallas' cannot run batch_invariant=True: use kernel='xla' or 'auto'")
            self.kernel = "xla"
        self.interpret = interpret
        cfg = model_def.config
        self.param_shardings = model_def.shardings(mesh)
        self.pool_sharding = attention.pool_sharding(mesh, cfg)
        self.pool = attention.init_pool(cfg, num_pages, page_size, model_def.dtype, self.pool_sharding)
        self.block_sharding = cache_sharding(mesh, cfg)  # the XLA path's dense working block
        # The block holds every layer's K and V for rows x span positions, all at once: on long
        # spans and many rows it would outgrow the pool itself (up to max_batch x max_seq_len,
        # the contiguous layout's memory). Above this budget (default: the pool's own bytes) a
        # call gathers per step and layer instead, which holds one layer's rows at a time.
        self.block_budget_bytes = sum(k.nbytes + v.nbytes for k, v in self.pool) if block_budget_bytes is None else block_budget_bytes
        self.params: Params | None = None
        self.derived: Derived = {}
        self._transpose_head = None
        if cfg.tie_word_embeddings and platform == "cpu":
            head_sharding = logical_sharding(model_def.axes["embed_tokens"][::-1], mesh, cfg)  # see ModelRunner
            self._transpose_head = jax.jit(lambda embed: embed.T, out_shardings=head_sharding)
        self._prefill = jax.jit(invariant.traced(self._prefill_impl, batch_invariant), donate_argnums=(2,))
        self._prefill_cached = jax.jit(invariant.traced(self._prefill_cached_impl, batch_invariant), donate_argnums=(2,))
        self._decode = jax.jit(
            invariant.traced(self._decode_impl, batch_invariant), donate_argnums=(2,), static_argnames=("span", "steps")
        )
        # the last call's top-k alternatives on the host, or None (see ModelRunner.alternatives)
        self.alternatives: tuple[np.ndarray, np.ndarray] | None = None

    # -- compiled functions -------------------------------------------------------------------

    def _prefill_impl(self, params, derived, pool, tokens, lengths, write_pages, tails, src_rows, sampling: SlotSampling):
        model = self.model_def.bind(params)
        tail_src, tail_start, tail_page = tails
        recorder = RouteRecorder(self.model_def.config.num_experts_per_tok)
        logits, pool = forward.prefill(
            model, pool, tokens, lengths, write_pages, tail_src, tail_start, tail_page, derived.get("head_t"),
            route=recorder,
        )
        new_tokens, logprobs, top = sample_top(logits[src_rows], sampling, lengths[src_rows])
        return new_tokens, logprobs, pool, recorder.routes(tokens.shape), top  # routes (B, P, moe layers, k)

    def _prefill_cached_impl(
        self, params, derived, pool, tokens, starts, lengths, write_pages, tails, page_table, src_rows, sampling: SlotSampling
    ):
        model = self.model_def.bind(params)
        tail_src, tail_start, tail_page = tails
        recorder = RouteRecorder(self.model_def.config.num_experts_per_tok)
        logits, pool = forward.prefill_cached(
            model, pool, tokens, starts, lengths, write_pages, tail_src, tail_start, tail_page, page_table,
            derived.get("head_t"), route=recorder,
        )
        new_tokens, logprobs, top = sample_top(logits[src_rows], sampling, (starts + lengths)[src_rows])
        return new_tokens, logprobs, pool, recorder.routes(tokens.shape), top  # routes of the rows run only

    def _decode_impl(
        self, params, derived, pool, page_table, tokens, positions, sampling: SlotSampling, *, span: int, steps: int
    ):
        model = self.model_def.bind(params)
        if self.gathers_once(page_table.shape[0], span):
            return self._decode_block(model, derived, pool, page_table, tokens, positions, sampling, span, steps)

        def step(carry, _):
            pool, tok, pos = carry
            recorder = RouteRecorder(self.model_def.config.num_experts_per_tok)
            logits, pool = forward.decode(
                model, pool, page_table, tok, pos, span, derived.get("head_t"),
                kernel=self.kernel, mesh=self.mesh, interpret=self.interpret, route=recorder,
            )
            nxt, lp, top = sample_top(logits, sampling, pos + 1)
            return (pool, nxt, pos + 1), (nxt, lp, recorder.routes(tok[:, None].shape)[:, 0], top)

        (pool, _, _), (toks, lps, routes, top) = jax.lax.scan(step, (pool, tokens, positions), None, length=steps)
        # (K, B) each; routes (K, B, moe layers, k) of the fed tokens; top: ids, logprobs (K, B, top_n)
        return toks, lps, pool, routes, top

    def gathers_once(self, rows: int, span: int) -> bool:
        """Whether a decode call of `rows` rows and `span` pages runs on one gathered block."""
        return self.kernel == "xla" and self.block_bytes(rows, span) <= self.block_budget_bytes

    def block_bytes(self, rows: int, span: int) -> int:
        """Bytes of the XLA path's dense working block for `rows` rows of `span` pages."""
        cfg = self.model_def.config
        per_position = cfg.num_kv_heads * cfg.head_dim * np.dtype(self.model_def.dtype).itemsize
        return 2 * cfg.num_layers * rows * span * self.page_size * per_position

    def _decode_block(
        self, model, derived, pool, page_table, tokens, positions, sampling: SlotSampling, span: int, steps: int
    ):
        """The XLA path: gather the rows' pages once, run the call's steps on the dense block as
        the contiguous decode does (row i is slot i, in place), write the new positions back."""
        block = forward.gather_rows(pool, page_table, span)
        if self.mesh.size > 1:  # laid out as the contiguous cache: by KV heads
            block = jax.lax.with_sharding_constraint(block, self.block_sharding)
        rows = jnp.arange(page_table.shape[0], dtype=jnp.int32)
        kv_len = span * self.page_size

        def step(carry, _):
            block, tok, pos = carry
            recorder = RouteRecorder(self.model_def.config.num_experts_per_tok)
            logits, block = model_forward.decode(
                model, block, rows, tok, pos, kv_len, derived.get("head_t"), in_place=True, route=recorder
            )
            nxt, lp, top = sample_top(logits, sampling, pos + 1)
            return (block, nxt, pos + 1), (nxt, lp, recorder.routes(tok[:, None].shape)[:, 0], top)

        (block, _, _), (toks, lps, routes, top) = jax.lax.scan(
            step, (block, tokens, positions), None, length=steps
        )
        return toks, lps, forward.write_rows(pool, block, page_table, positions, steps), routes, top

    # -- weights ------------------------------------------------------------------------------

    def derive(self, params: Params) -> Derived:
        """Serving-only leaves made at staging (see `ModelRunner.derive`)."""
        if self._transpose_head is None:
            return {}
        return {"head_t": self._transpose_head(params["embed_tokens"])}

    def set_params(self, params: Params, derived: Derived | None = None) -> None:
        self.derived = self.derive(params) if derived is None else derived
        self.params = params

    def place(self, path: str, array) -> jax.Array:
        """Copy one host array onto the devices with the engine's sharding (never aliases)."""
        return placement.place(array, self.param_shardings[path])

    # -- host-facing API ----------------------------------------------------------------------

    def prefill(
        self, prompts: list[list[int]], groups: list[list[list[int]]], sampling: SlotSampling,
        starts: list[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, jax.Array]:
        """Prefill each prompt once into the page tables of its group of samples.

        groups[r] lists the page tables of prompt r's samples (as `PagePool.admit_group` made
        them: full pages shared, a private last page each). `sampling` has max_batch rows, one
        per destination in group order. Returns each destination's first sampled token and its
        logprob, (max_batch,) on the host, and the experts of every prompt position (prompts,
        length bucket, moe layers, k) int16, left on the devices (see `ModelRunner.prefill`).

        `starts[r]` (whole pages): prompt r's leading positions already hold its K/V in its
        group's pages (prefix cache hits); only the rest is run, attending over those pages too,
        and its routes cover only the rest (callers that need every position's pass 0).
        """
        assert self.params is not None, "set_params() before generating"
        starts = starts if starts and any(starts) else None
        run = [len(x) - (starts[r] if starts else 0) for r, x in enumerate(prompts)]
        plan = plan_prefill(
            prompts, groups, page_size=self.page_size, num_pages=self.num_pages, max_batch=self.max_batch,
            bucket=min(pow2_at_least(max(run), self.min_prefill_len), self.width * self.page_size), starts=starts,
        )
        if starts is not None:
            span = self.span_pages(max(len(x) for x in prompts))
            table = np.full((len(plan.tokens), span), self.num_pages, np.int32)
            for r, tables in enumerate(groups):
                pages = tables[0][:span]
                table[r, : len(pages)] = pages
            toks, lps, self.pool, routes, top = self._prefill_cached(
                self.params, self.derived, self.pool, plan.tokens, plan.starts, plan.lengths, plan.write_pages,
                plan.tails, table, plan.src_rows, sampling,
            )
            self.alternatives = alternatives_to_host(top, sampling)
            return np.asarray(toks), np.asarray(lps), routes
        toks, lps, self.pool, routes, top = self._prefill(
            self.params, self.derived, self.pool, plan.tokens, plan.lengths, plan.write_pages,
            plan.tails, plan.src_rows, sampling,
        )
        self.alternatives = alternatives_to_host(top, sampling)
        return np.asarray(toks), np.asarray(lps), routes

    def decode(
        self, tables: list[list[int] | None], tokens: np.ndarray, positions: np.ndarray, sampling: SlotSampling
    ) -> tuple[np.ndarray, np.ndarray, jax.Array]:
        """Run `decode_steps` steps (one with a structured-output row: `call_steps`) for the
        rows of `tables` (None: a padding row), padded to `decode_batch(len(tables))` rows.

        tables[i] should cover positions [0, positions[i] + decode_steps) (`PagePool.grow`):
        writes past a row's pages are dropped, so steps there give meaningless tokens (fine
        for steps past a sequence's end). tokens, positions (len(tables),); `sampling` has
        decode_batch(len(tables)) rows. Returns tokens and logprobs (K, rows) on the host, and
        the experts of each step's fed token (K, rows, moe layers, k), left on the devices.
        """
        assert self.params is not None, "set_params() before generating"
        steps = call_steps(sampling, self.decode_steps)
        table, tok, pos, span = self.decode_inputs(tables, tokens, positions, steps)
        toks, lps, self.pool, routes, top = self._decode(
            self.params, self.derived, self.pool, table, tok, pos, sampling, span=span, steps=steps
        )
        self.alternatives = alternatives_to_host(top, sampling)
        return np.asarray(toks), np.asarray(lps), routes

    def decode_inputs(
        self, tables: list[list[int] | None], tokens: np.ndarray, positions: np.ndarray, steps: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """The padded arrays and span bucket `decode` runs: page table (rows, width), tokens and
        positions (rows,), with rows = decode_batch(len(tables)), and the span in pages."""
        rows = self.decode_batch(len(tables))
        table = np.full((rows, self.width), self.num_pages, np.int32)  # unused entries: out of range
        tok = np.zeros((rows,), np.int32)
        pos = np.full((rows,), self.width * self.page_size, np.int32)  # padding rows
        top = 1
        for i, pages in enumerate(tables):
            if pages is None:
                continue
            if len(pages) > self.width:
                raise ValueError(f"row {i} has {len(pages)} pages; at most max_seq_len / page_size = {self.width}")
            table[i, : len(pages)] = pages
            tok[i] = tokens[i]
            pos[i] = positions[i]
            top = max(top, int(positions[i]) + (steps or self.decode_steps))
        return table, tok, pos, self.span_pages(top)

    def span_pages(self, top: int) -> int:
        """The attention span bucket, in pages, of a call whose longest row reaches `top` positions."""
        return min(pow2_at_least(pages_for(top, self.page_size), self.min_span_pages), self.width)

    def decode_groups(self, positions: list[int]) -> list[list[int]]:
        """How to decode rows at `positions` this pass: one call of all rows (indices in order),
        or, on the XLA path, two calls, the shorter rows and the longer ones, when that is
        estimated cheaper (`call_cost`): a call's span is its longest row's, so short rows
        beside a long one would otherwise read, and gather, the long span."""
        rows = list(range(len(positions)))
        if self.kernel != "xla" or len(rows) < 2:
            return [rows]
        by_length = sorted(rows, key=positions.__getitem__)
        spans = [self.span_pages(positions[i] + self.decode_steps) for i in by_length]
        best, groups = self.call_cost(len(rows), spans[-1]), [rows]
        for k in range(1, len(rows)):
            if spans[k] == spans[k - 1]:
                continue  # the same span bucket: splitting here reads nothing less
            cost = self.call_cost(k, spans[k - 1]) + self.call_cost(len(rows) - k, spans[-1])
            if cost < best:
                best, groups = cost, [sorted(by_length[:k]), sorted(by_length[k:])]
        return groups

    # A decode step's cost on the XLA path (CPU), as bytes read at equal time: the weights (read
    # once per step however many rows run), each row's matmuls (2 x parameters FLOPs, at
    # BYTES_PER_FLOP) and each row's span of K/V. BYTES_PER_FLOP is this 2-core CPU's balance,
    # fitted to 8-step calls of `rollout bench paged`'s model (2026-12-01, 8-128 rows at spans of
    # 64-512 positions: ~140 ms + ~7.3 ms per row + ~0.0126 ms per row-position per call, i.e.
    # ~16 GB/s of weights, ~150 GFLOP/s, ~20 GB/s of K/V); gathering once or every step cost
    # the same within 15%. Only the ratios matter, and only to choose one call or two.
    BYTES_PER_FLOP = 0.13

    def call_cost(self, active: int, span: int) -> float:
        """The estimated cost of one decode step of `active` rows over `span` pages (bytes)."""
        rows = self.decode_batch(active)
        weights = self.model_def.spec.nbytes
        flops = 2 * weights / np.dtype(self.model_def.dtype).itemsize
        return weights + rows * flops * self.BYTES_PER_FLOP + self.block_bytes(rows, span)

    def decode_batch(self, active: int) -> int:
        """Rows a decode call runs for `active` sequences, at most max_batch: the next of 1, 2, 3,
        4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x them). Every padding row costs a real
        row's matmuls, so finer buckets than powers of two (up to 50% padding, here at most
        33%) pay for their twice as many compiled shapes."""
        return min(batch_bucket(active), self.max_batch)

    def compiled_count(self) -> int:
        """Executables compiled so far (grows only with new shape buckets)."""
        return (
            compiled_executables(self._prefill) + compiled_executables(self._prefill_cached)
            + compiled_executables(self._decode)
        )
