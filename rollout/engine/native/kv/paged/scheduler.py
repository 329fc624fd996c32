"""PagedScheduler: the engine's scheduler over a page pool instead of max_seq_len slots.

Decode slots are only rows of the decode batch here; KV memory is the pool's pages, held by
sequences through their page tables (`rollout.engine.native.kv.paged.pool.PagePool`). What changes against the
contiguous `Scheduler` (both are `BaseScheduler`s), each pass:

- Admission: a request is admitted when it has n free slots, its prompt's pages fit (the n
  samples share the prompt's full pages) and the projected page use of the running sequences
  and the new ones, each growing to its planned length, stays within the pool
  (`rollout.engine.native.kv.paged.admission`: the plan's ratio is learned from finished sequences). A group
  that cannot fit even in an empty pool fails with an error; one that comes to an idle engine
  is admitted when its prompt pages fit.
- Growth and preemption: before each decode call every running sequence's pages are grown to
  cover the call's positions, oldest first; when the pool is short, the youngest sequences are
  preempted: their pages are freed and they are *parked*, keeping their tokens. Parked
  sequences are recomputed (prefill of prompt + generated tokens into fresh pages) as soon as
  they fit again (the same projection), oldest first, before any new request: none is lost or
  returned twice. A preemption raises the planned lengths at once (see the admission module).
- Finish and cancel free a sequence's pages (cancelling also reaches parked sequences).
- Swaps: `drain` waits for running *and* parked sequences, which resume on the old weights;
  `recompute` drops every running sequence's pages (KV of the old weights) and re-prefills it on
  the new ones, parking those that no longer fit; `continue` keeps the pages.
- Prefix cache (`EngineConfig.prefix_cache`, rollout.engine.native.kv.paged.prefix_cache): an
  admission (or a resume) starts its table with the cached full pages its tokens begin with and
  prefills only the rest; each prefill publishes the full pages it wrote. Every swap, whatever
  its policy, drops every entry before anything is admitted on the new weights (a `continue`
  swap's running sequences keep their old pages, which no new request can find any more).
  Requests that return routed experts (MoE routing replay) bypass the lookup: routes come from
  a prefill of every prompt position. A request whose first uncached page another request
  admitted in the same pass computes (a burst sharing a system prompt) waits for the next pass,
  which finds that page cached: the shared prefix is prefilled once, not once per request.

Age is the first admission's order, kept across preemptions, so the oldest sequences always
progress. Pool bookkeeping is the scheduler thread's alone; `kv_status` publishes a snapshot
after each pass for other threads.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading

from rollout.engine.config import EngineConfig
from rollout.engine.native.kv.paged.admission import LengthEstimate, PlanRow, PoolPlan
from rollout.engine.native.kv.paged.pool import PagePool, pages_for
from rollout.engine.native.kv.paged.runner import PagedRunner
from rollout.engine.native.sampling import stack_sampling, with_masks
from rollout.engine.native.scheduler import BaseScheduler
from rollout.engine.native.sequence import Request, Sequence
from rollout.engine.weight_state import PendingSwap, WeightState

log = logging.getLogger("rollout.engine")


class PoolTooSmallError(ValueError):
    """A request's prompt pages do not fit even in an empty pool."""


class PagedScheduler(BaseScheduler[PagedRunner]):
    def __init__(
        self, lock: threading.Condition, runner: PagedRunner, weights: WeightState, config: EngineConfig, pool: PagePool
    ):
        # Set before the base class starts the thread.
        self.pool = pool
        self.parked: list[Sequence] = []  # preempted, oldest first; recomputed when they fit
        self._age: dict[Sequence, int] = {}
        self._ticks = itertools.count()
        self.estimate = LengthEstimate(fixed=config.kv_admission_ratio)
        self.peak_active = 0
        self.prefill_tokens = 0  # positions run by prefills (cache hits are not run)
        self._starts: dict[Sequence, int] = {}  # a group's first sequence -> positions found cached
        self._kv_status = self._snapshot()
        super().__init__(lock, runner, weights, config)

    # -- status (any thread) ------------------------------------------------------------------

    def kv_status(self) -> dict:
        """Pool use, shared pages, preemptions and parked sequences, as of the last pass."""
        return dict(self._kv_status)

    def _snapshot(self) -> dict:
        stats = self.pool.stats()
        return {
            "layout": "paged",
            "page_size": stats.page_size,
            "pages": stats.num_pages,
            "pages_used": stats.used_pages,
            "pool_use": round(stats.use, 4),
            "shared_pages": stats.shared_pages,
            "pages_saved_by_sharing": stats.pages_saved_by_sharing,
            "preemptions": stats.preemptions,
            "parked": len(self.parked),
            "peak_active": self.peak_active,
            "admission_ratio": round(self.estimate.ratio, 3),
            "prefill_tokens": self.prefill_tokens,
            "prefix_cache": self.pool.cache.stats().as_dict() if self.pool.cache is not None else None,
        }

    # -- the scheduler thread -----------------------------------------------------------------

    def _held(self) -> bool:
        return bool(self.parked)

    def _publish(self) -> None:
        self.peak_active = max(self.peak_active, self.slots.active())
        self._kv_status = self._snapshot()

    def _take_cancelled(self) -> list[Sequence]:
        hit = set(self._cancelled)  # the base class takes the set; parked sequences are ours
        parked = [s for s in self.parked if s.request.future in hit]
        for seq in parked:
            self.parked.remove(seq)
        return super()._take_cancelled() + parked

    def _limit(self, seq: Sequence) -> int:
        """Positions `seq` may reach: prompt + max_tokens."""
        return len(seq.request.prompt_ids) + seq.request.sampling.max_tokens

    def _plan(self) -> PoolPlan:
        """The running sequences' projected page use, for an admission. Under the lock."""
        plan = PoolPlan(self.pool.num_pages, self.pool.page_size, self._config.decode_steps)
        steps = self._config.decode_steps
        for seq in self.slots.running():
            prefix, share = self.pool.shared_prefix(seq)
            plan.rows.append(PlanRow(
                position=seq.position, end=self.estimate.end(seq.position, self._limit(seq), steps),
                prefix=prefix, prefix_share=share, own=self.pool.pages_held(seq) - prefix,
            ))
        return plan

    def _fresh_rows(self, length: int, limit: int, n: int) -> list[PlanRow]:
        """Plan rows of n sequences right after the prefill of a shared `length`-token context
        (a request's prompt, or a parked sequence's context with n = 1), as `admit_group` lays
        out their pages: with n > 1 the full pages shared, a private tail page each."""
        end = self.estimate.end(length, limit, self._config.decode_steps)
        if n == 1:
            return [PlanRow(position=length, end=end, prefix=0, prefix_share=0.0, own=pages_for(length, self.pool.page_size))]
        full, tail = divmod(length, self.pool.page_size)
        return [PlanRow(position=length, end=end, prefix=full, prefix_share=full / n, own=int(tail > 0))] * n

    def _resume(self) -> list[Sequence]:
        """Parked sequences that fit again, oldest first, into free slots. Under the lock."""
        resumed: list[Sequence] = []
        free = len(self.slots.free())
        plan: PoolPlan | None = None
        while self.parked and len(resumed) < min(free, self._config.max_prefill_batch):
            plan = plan or self._plan()
            seq = self.parked[0]
            rows = self._fresh_rows(len(seq.context()), self._limit(seq), 1)
            alone = self.slots.active() == 0 and not resumed
            if not plan.admit(rows, force=alone):
                break
            start = self.pool.admit_cached([seq], seq.context(), reuse=not seq.request.return_routed_experts)
            if start is None:
                break
            self._starts[seq] = start
            self.parked.pop(0)
            self.slots.occupy([seq])
            resumed.append(seq)
        return resumed

    def _admit(self) -> list[Request]:
        """Waiting requests whose samples fit in free slots and whose projected pages fit in the
        pool, first come first served. Under the lock."""
        free = len(self.slots.free())
        admitted: list[Request] = []
        plan: PoolPlan | None = None
        computing: set[tuple[int, ...]] = set()  # first uncached pages of this pass's admissions
        while self.waiting and len(admitted) < self._config.max_prefill_batch:
            request = self.waiting[0]
            n = request.sampling.n
            if n > free:
                break
            miss = None if request.return_routed_experts else self.pool.first_miss(request.prompt_ids)
            if miss is not None and miss in computing:
                break  # the next pass finds it cached (see the module)
            plan = plan or self._plan()
            seqs = request.sequences
            prompt = len(request.prompt_ids)
            rows = self._fresh_rows(prompt, prompt + request.sampling.max_tokens, n)
            alone = self.slots.active() == 0 and not admitted  # admitted when its prompt fits: see the module
            start = None
            if plan.admit(rows, force=alone):
                start = self.pool.admit_cached(seqs, request.prompt_ids, reuse=not request.return_routed_experts)
            if start is None:
                if alone:  # an empty pool cannot hold its prompt: it never will
                    self.waiting.popleft()
                    plan = None  # it held this request's rows only (nothing runs): start afresh
                    need = self.pool.group_pages(prompt, n)
                    request.future.set_exception(PoolTooSmallError(
                        f"a {prompt}-token prompt with n={n} samples needs {need} pages of "
                        f"{self.pool.page_size} tokens; the pool has {self.pool.num_pages}: raise kv_pages "
                        f"(or kv_memory_fraction), or lower n"
                    ))
                    continue
                break
            self.waiting.popleft()
            self._starts[seqs[0]] = start
            if miss is not None:
                computing.add(miss)
            for seq in seqs:
                self._age[seq] = next(self._ticks)
            self.slots.occupy(seqs)
            admitted.append(request)
            free -= n
        return admitted

    def _swap(self, swap: PendingSwap) -> None:
        self._drop_prefix_cache(swap.weights.version)
        if swap.policy == "recompute":
            # KV computed under the old weights is never reused: drop it, re-admit oldest first.
            running = sorted(self.slots.running(), key=self._age.__getitem__)
            for seq in running:
                self.pool.free(seq)
            for seq in running:
                if not self.pool.admit_group([seq], len(seq.context())):
                    self.pool.count_preemption()
                    self._park(seq)
        super()._swap(swap)  # swaps the leaves; under recompute, re-prefills slots.running()

    def _drop_prefix_cache(self, version: int) -> None:
        """Forget every cached prefix: KV of the old weights is never found again (swap)."""
        self.pool.drop_cache(version)

    def _prefill(self, contexts: list[list[int]], groups: list[list[Sequence]]) -> None:
        rows = [seq.sampling for group in groups for seq in group]
        tables = [[self.pool.table(seq) for seq in group] for group in groups]
        starts = [self._starts.pop(group[0], 0) for group in groups]
        sampling = with_masks(stack_sampling(rows, self._config.max_batch), [s.constraint for g in groups for s in g])
        tokens, logprobs, routes = self._runner.prefill(contexts, tables, sampling, starts)
        self.prefill_tokens += sum(len(c) - start for c, start in zip(contexts, starts))
        for context, group in zip(contexts, groups):  # before any of them can finish and free its pages
            self.pool.register(group[0], context, self._weights.serving)
        self._accept_prefilled(groups, tokens, logprobs, routes, self._runner.alternatives)

    def _grow_or_preempt(self) -> None:
        """Pages for one decode call of every running sequence, oldest first; the youngest are
        preempted (parked) when the pool runs short."""
        steps = self._config.decode_steps
        running = sorted(self.slots.running(), key=self._age.__getitem__)
        for seq in running:
            if seq.slot < 0:
                continue  # preempted for an older one in this pass
            need = min(seq.position + steps, self._limit(seq))
            while not self.pool.grow(seq, need):
                youngest_first = [s for s in reversed(running) if s.slot >= 0]
                extra = pages_for(need, self.pool.page_size) - len(self.pool.table(seq))
                victims = self.pool.victims(youngest_first, extra)
                assert victims, "the pool cannot hold one sequence of max_seq_len"
                for victim in victims:
                    self.pool.preempt(victim)
                    self._park(victim)
                    if victim is seq:
                        break
                if seq.slot < 0:
                    break

    def _park(self, seq: Sequence) -> None:
        """Take `seq` off its slot (its pages are already gone); it waits to be recomputed. The
        planned lengths were too short: they go up (LengthEstimate.preempted)."""
        self.estimate.preempted()
        with self._lock:
            self.slots.release(seq)
            self.parked.append(seq)
            self.parked.sort(key=self._age.__getitem__)
        log.info(json.dumps({"event": "preempted", "tokens": len(seq.tokens), "parked": len(self.parked)}))

    def _decode(self) -> None:
        self._grow_or_preempt()
        if not self.slots.active():
            return
        self.estimate.decoded()
        sequences = self.slots.sequences
        running = [slot for slot, seq in enumerate(sequences) if seq is not None]
        groups = self._runner.decode_groups([int(self.slots.positions[slot]) for slot in running])
        for group in groups:  # one call, or the short rows and the long ones (PagedRunner.decode_groups)
            only = [running[i] for i in group] if len(groups) > 1 else None
            batch = self.slots.decode_batch(self._runner.decode_batch(len(group)), only)
            tables = [
                self.pool.table(sequences[slot]) if slot < self.slots.max_batch and sequences[slot] is not None else None
                for slot in batch.order
            ]
            tokens, logprobs, routes = self._runner.decode(tables, batch.tokens, batch.positions, batch.sampling)
            self._accept_decoded(batch.order, tokens.tolist(), logprobs.tolist(), routes, self._runner.alternatives)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.pool:
            self.pool.free(seq)
        if reason != "abort":
            self.estimate.finished(len(seq.tokens), seq.request.sampling.max_tokens)
        self._age.pop(seq, None)
        self._starts.pop(seq, None)
        self._publish()  # before the future resolves: a caller then sees the pages free
        super()._finish(seq, reason)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            parked, self.parked = self.parked, []
        super()._fail_all(error)
        for seq in parked:
            if not seq.request.future.done():
                seq.request.future.set_exception(error)
