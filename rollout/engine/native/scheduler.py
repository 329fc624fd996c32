"""The scheduler: the one thread that runs the model, and the queue callers feed it.

Each pass it (1) finishes cancelled requests, (2) applies a committed weight swap if the swap
policy allows it now, (3) admits waiting requests into free slots and prefills them in one batch
(the n samples of a prompt share it), and (4) runs `decode_steps` decode steps for every
running slot. A burst of requests that arrives while nothing decodes is prefilled chunk after
chunk before its first decode step, so it decodes as one batch.

Swap policies, applied at a step boundary after `commit`:
- drain (default): running sequences finish on the old weights; new ones wait for the swap.
- recompute: swap now; running sequences re-prefill prompt + generated tokens on the new weights.
- continue: swap now and keep their KV cache; each token records the version that produced it.

`BaseScheduler` holds all of this; a KV layout's subclass runs the model through its runner in
`_prefill` and `_decode`: `Scheduler` for contiguous slots here, `PagedScheduler` for a page pool
in `rollout.engine.native.kv.paged.scheduler`.

What each thread owns is stated once, in `rollout.engine.native.engine`.
"""

from __future__ import annotations

import abc
import json
import logging
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np

from rollout.engine.config import EngineConfig
from rollout.engine.native.runner import ModelRunner, Params
from rollout.engine.native.runner_api import Runner
from rollout.engine.native.sampling import stack_sampling, with_masks
from rollout.engine.native.sequence import Request, RequestFuture, Sequence
from rollout.engine.native.slots import SlotTable
from rollout.engine.types import Completion, EngineClosedError
from rollout.engine.weight_state import PendingSwap, WeightState

log = logging.getLogger("rollout.engine")

RunnerT = TypeVar("RunnerT", bound=Runner)


class BaseScheduler(abc.ABC, Generic[RunnerT]):
    """The loop, queue, cancel, swap and finish logic every KV layout shares. A layout's
    subclass runs the model through its own runner (`RunnerT`) in `_prefill` and `_decode`."""

    def __init__(
        self, lock: threading.Condition, runner: RunnerT, weights: WeightState[Params], config: EngineConfig
    ):
        self._lock = lock
        self._runner = runner
        self._weights = weights
        self._config = config
        self.slots = SlotTable(config.max_batch, config.max_seq_len)
        self.waiting: deque[Request] = deque()
        # futures to abort at the next pass (held, not their id(): a freed future's id can be reused)
        self._cancelled: set[Future[list[Completion]]] = set()
        self.closed = False
        self.error: BaseException | None = None  # why the thread died, if it did
        self._parked = False  # the thread sleeps with nothing to do (wait_idle); under the lock
        self.tokens_generated = 0
        self.requests_finished = 0
        self._thread = threading.Thread(target=self._loop, name="rollout-scheduler", daemon=True)
        self._thread.start()

    # -- called from any thread ---------------------------------------------------------------

    def submit(self, requests: list[Request]) -> None:
        with self._lock:
            self.check_open()
            self.waiting.extend(requests)
            self._lock.notify_all()

    def cancel(self, future: Future[list[Completion]]) -> bool:
        """Cancel the request of `future`: True if it is cancelled (no token of it is accepted
        after this; its unfinished samples end "abort" at the next pass), False if every sample
        finished first or it is not a request of this engine (RequestFuture.claim_cancel)."""
        if not isinstance(future, RequestFuture) or not future.claim_cancel():
            return False
        with self._lock:
            self._cancelled.add(future)
            self._lock.notify_all()
        return True

    @property
    def stopped(self) -> bool:
        """Shut down or died: nothing will be swapped in any more. Under the lock."""
        return self.closed or self.error is not None

    def wait_idle(self, timeout: float | None) -> None:
        """Block until the thread sleeps with nothing to do (or the engine stops). A request's
        future resolves inside its last pass; until that pass ends, the thread still holds the
        pass's inputs (device arrays). Once idle it holds none: what memory checks measure."""
        with self._lock:
            ok = self._lock.wait_for(lambda: self._parked or self.closed or self.error is not None, timeout)
        if not ok:
            raise TimeoutError(f"the engine's scheduler was still busy after {timeout}s")

    def check_open(self) -> None:
        if self.error is not None:
            raise EngineClosedError(f"the engine's scheduler died: {self.error!r}") from self.error
        if self.closed:
            raise EngineClosedError("the engine is shut down; create a new one")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def shutdown(self) -> None:
        """Stop the thread; queued and running requests fail with EngineClosedError."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._lock.notify_all()
        self._thread.join(timeout=60)
        self._fail_all(EngineClosedError("the engine was shut down before the request finished"))

    # -- the scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        """One pass: cancel, swap (under its policy), resume held sequences, admit new requests
        and prefill them, decode. Sequences a layout holds outside the slots (`_held`: the paged
        layout's preempted ones) keep the loop awake, count as running for `drain`, and are
        resumed before new requests are admitted."""
        burst = False  # requests were prefilled while nothing decoded (max_prefill_batch bounds
        # the prefill latency seen by *running* sequences; during a burst none are waiting on it)
        try:
            while True:
                with self._lock:
                    if not self._has_work():
                        self._parked = True
                        self._lock.notify_all()  # wait_idle
                        self._lock.wait_for(self._has_work)
                        self._parked = False
                    if self.closed:
                        return
                    cancelled = self._take_cancelled()
                    swap = self._weights.take_swap(running=self.slots.active() > 0 or self._held())
                    # nothing joins in a pass that swaps: a recompute swap re-prefills the running
                    # sequences, and one admitted or resumed before it would be prefilled twice
                    resumed = self._resume() if swap is None else []
                    # nor after a resume: the resumed are not prefilled yet, and admission plans from positions
                    admitted = (
                        [] if swap is not None or self._weights.pending or self._held() or resumed else self._admit()
                    )
                    self._publish()  # with the slots just occupied: status sees both at once
                for seq in cancelled:
                    self._finish(seq, "abort")
                if swap is not None:
                    self._swap(swap)
                if resumed:
                    self._prefill([s.context() for s in resumed], [[s] for s in resumed])
                if admitted:
                    # a burst starts when the admitted sequences are all that runs
                    burst = burst or self.slots.active() == sum(r.sampling.n for r in admitted)
                    self._prefill([r.prompt_ids for r in admitted], [r.sequences for r in admitted])
                    if burst:
                        self._publish()
                        continue  # the next pass admits more of it, or decodes when none fits
                burst = False
                if self.slots.active():
                    self._decode()
                self._publish()
        except BaseException as err:  # surface scheduler crashes to every caller
            log.exception("scheduler crashed")
            with self._lock:
                self.error = err
            self._fail_all(EngineClosedError(f"the engine's scheduler crashed: {err!r}"))

    def _has_work(self) -> bool:
        """Whether a pass has anything to do (else the thread sleeps). Under the lock."""
        return bool(
            self.closed or self.waiting or self._weights.pending or self._cancelled
            or self.slots.active() or self._held()
        )

    # -- hooks of a layout that holds sequences outside the slots (paged: preempted, parked) ----

    def _held(self) -> bool:
        """Whether sequences wait outside the slots to be resumed. Under the lock."""
        return False

    def _resume(self) -> list[Sequence]:
        """Held sequences put back into slots now (each is re-prefilled from its context).
        Under the lock."""
        return []

    def _publish(self) -> None:
        """After each pass (and under the lock once admission is done): the layout's status."""

    def _take_cancelled(self) -> list[Sequence]:
        """Sequences of cancelled requests, waiting ones included (they finish with no tokens).
        Under the lock."""
        if not self._cancelled:
            return []
        hit, self._cancelled = self._cancelled, set()
        out = [s for s in self.slots.running() if s.request.future in hit]
        for request in [r for r in self.waiting if r.future in hit]:
            self.waiting.remove(request)
            out += request.sequences
        return out

    def _admit(self) -> list[Request]:
        """Move waiting requests into free slots, first come first served. Under the lock."""
        free = len(self.slots.free())
        admitted: list[Request] = []
        while self.waiting and len(admitted) < self._config.max_prefill_batch:
            n = self.waiting[0].sampling.n
            if n > free:
                break  # do not starve large groups
            admitted.append(self.waiting.popleft())
            self.slots.occupy(admitted[-1].sequences)
            free -= n
        return admitted

    def _swap(self, swap: PendingSwap[Params]) -> None:
        self._weights.apply(swap)  # the runner serves the new leaves; the old ones go here
        log.info(json.dumps({"event": "weights_swapped", "version": swap.weights.version, "policy": swap.policy}))
        if swap.policy == "recompute":
            running = self.slots.running()
            chunk = self._config.max_prefill_batch
            for start in range(0, len(running), chunk):
                seqs = running[start : start + chunk]
                self._prefill([s.context() for s in seqs], [[s] for s in seqs])

    @abc.abstractmethod
    def _prefill(self, contexts: list[list[int]], groups: list[list[Sequence]]) -> None:
        """Prefill each context once for the sequences of its group; sample each one's next
        token and `_accept_prefilled` them, in group order."""

    @abc.abstractmethod
    def _decode(self) -> None:
        """Run one decode call (`decode_steps` steps) for the running sequences and
        `_accept_decoded` its tokens."""

    def _accept_prefilled(
        self, groups: list[list[Sequence]], tokens: np.ndarray, logprobs: np.ndarray, routes: Any = None,
        alternatives: Alternatives = None,
    ) -> None:
        """Accept a prefill call's first token of every sequence, in group order (one row each).
        `routes` (groups, length, moe layers, k): the experts of each context's positions.
        `alternatives` (the runner's, or None): top-k ids and logprobs (rows, top_n)."""
        host = _routes_to_host(routes, (s for group in groups for s in group))
        m = 0
        for row, group in enumerate(groups):
            for seq in group:
                fed = len(seq.context())
                top = None if alternatives is None else (alternatives[0][m], alternatives[1][m])
                self._accept(seq, int(tokens[m]), float(logprobs[m]), None if host is None else host[row, :fed], top)
                m += 1

    def _accept_decoded(
        self, order: tuple[int, ...], tokens: list[list[int]], logprobs: list[list[float]], routes: Any = None,
        alternatives: Alternatives = None,
    ) -> None:
        """Accept a decode call's (K, rows) tokens row by row (row i is slot order[i]); a
        sequence takes its tokens until one finishes it. `routes` (K, rows, moe layers, k): the
        experts of each step's fed token. `alternatives`: top-k ids and logprobs (K, rows, top_n)."""
        sequences = self.slots.sequences
        live = [sequences[slot] for slot in order if slot < self.slots.max_batch]
        host = _routes_to_host(routes, (s for s in live if s is not None))
        for row, slot in enumerate(order):
            seq = sequences[slot] if slot < self.slots.max_batch else None
            if seq is None:
                continue
            for k in range(len(tokens)):
                top = None if alternatives is None else (alternatives[0][k, row], alternatives[1][k, row])
                if self._accept(seq, tokens[k][row], logprobs[k][row], None if host is None else host[k, row][None], top):
                    break

    def _accept(
        self, seq: Sequence, token: int, logprob: float, routes: np.ndarray | None = None,
        top: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> bool:
        """Record a sampled token; finish the sequence if a stop fires. True if it finished (or
        its request was cancelled: the token is dropped, the next pass ends the sequence "abort").
        Every token of every sequence passes here once (the place for a per-token stream)."""
        future = seq.request.future
        with future.cancel_lock:  # against Engine.cancel: see RequestFuture
            if future.cancel_asked:
                return True
            reason = seq.append(token, logprob, self._weights.serving, routes, top)
            if reason is not None and all(s.finish_reason is not None for s in seq.request.sequences if s is not seq):
                future.settled = True  # the last sample finished by itself: a cancel now is refused
        self.tokens_generated += 1
        if reason is None:
            self.slots.advance(seq, token)
            if seq.request.sink is not None:
                seq.request.sink.update(seq)
            return False
        self._finish(seq, reason)
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.request.sink is not None:  # before the future resolves: its reader drains first
            seq.request.sink.update(seq)
        if seq.slot >= 0:
            with self._lock:
                self.slots.release(seq)
                self._lock.notify_all()
        request = seq.request
        if request.finished:
            self.requests_finished += 1
            request.future.set_result([s.completion(self._weights.serving) for s in request.sequences])

    def _fail_all(self, error: BaseException) -> None:
        """Fail every queued and running request (the thread has stopped or is stopping)."""
        with self._lock:
            requests = list(self.waiting) + list({id(s.request): s.request for s in self.slots.clear()}.values())
            self.waiting.clear()
            self._lock.notify_all()  # commit(wait=True) stops waiting for a swap
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)


# a forward's top-k alternatives on the host: (ids, logprobs), or None when none were asked for
Alternatives = tuple[np.ndarray, np.ndarray] | None


def _routes_to_host(routes: Any, sequences: Iterable[Sequence]) -> np.ndarray | None:
    """A forward's routes on the host if any of `sequences` asks for them (else no copy)."""
    if routes is None or not any(s.request.return_routed_experts for s in sequences):
        return None
    return np.asarray(routes)


class Scheduler(BaseScheduler[ModelRunner]):
    """The contiguous layout: each slot owns max_seq_len positions of the runner's KV cache."""

    def _prefill(self, contexts: list[list[int]], groups: list[list[Sequence]]) -> None:
        """Prefill each context once into the slots of its group; sample each slot's next token."""
        dst, src, rows = [], [], []
        for row, group in enumerate(groups):
            for seq in group:
                dst.append(seq.slot)
                src.append(row)
                rows.append(seq.sampling)
        sampling = with_masks(stack_sampling(rows, self._config.max_batch), [s.constraint for g in groups for s in g])
        tokens, logprobs, routes = self._runner.prefill(contexts, dst, src, sampling)
        self._accept_prefilled(groups, tokens, logprobs, routes, self._runner.alternatives)

    def _decode(self) -> None:
        batch = self.slots.decode_batch(self._runner.decode_batch(self.slots.active()))
        tokens, logprobs, routes = self._runner.decode(batch.slots, batch.tokens, batch.positions, batch.sampling)
        self._accept_decoded(batch.order, tokens.tolist(), logprobs.tolist(), routes, self._runner.alternatives)  # (K, B)
