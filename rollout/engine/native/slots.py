"""The scheduler's loop state: which sequence holds each decode slot, and what each slot feeds
the next decode step.

Per slot (max_batch of them; the KV cache has one row per slot):
- `sequences[slot]`: the running `Sequence`, or None when the slot is idle;
- `tokens[slot]`: its pending token, sampled but not yet written to the KV cache;
- `positions[slot]`: that token's position; idle slots hold max_seq_len (decoded as padding);
- the sampler row: its sequence's `SamplingRow`, or the greedy `IDLE_ROW`.

Occupancy (`occupy`, `release`, `clear`) changes only under the engine's lock, so that other
threads may count slots under it; the arrays and the cached device sampling rows are the
scheduler thread's alone (see `rollout.engine.native.engine`).

Everything a slot holds is here, so a paged KV cache adds its per-slot page table beside
`positions` (pages taken in `occupy`/`advance`, given back in `release`), and preempting a
sequence is `release` plus re-queueing it: a re-prefill of `Sequence.context()` resumes it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rollout.engine.native.sampling import IDLE_ROW, SlotSampling, stack_sampling, with_masks
from rollout.engine.native.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    """The inputs of one decode call: `order[row]` is the slot of each row (max_batch = padding)."""

    order: tuple[int, ...]
    slots: np.ndarray  # (B,) int32
    tokens: np.ndarray  # (B,) int32
    positions: np.ndarray  # (B,) int32
    sampling: SlotSampling  # B rows


class SlotTable:
    def __init__(self, max_batch: int, max_seq_len: int):
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.sequences: list[Sequence | None] = [None] * max_batch
        self.tokens = np.zeros(max_batch, np.int32)  # (max_batch,) pending token per slot
        self.positions = np.full(max_batch, max_seq_len, np.int32)  # (max_batch,) its position
        # device sampling rows by decode order; emptied when occupancy changes (a paged decode
        # split in two calls alternates two orders)
        self._sampling: dict[tuple[int, ...], SlotSampling] = {}

    # -- occupancy (under the engine's lock) --------------------------------------------------

    def occupy(self, sequences: list[Sequence]) -> None:
        """Give each sequence a free slot (the caller checked there are enough)."""
        free = iter(self.free())
        for seq in sequences:
            seq.slot = next(free)
            self.sequences[seq.slot] = seq
        self._sampling = {}

    def release(self, seq: Sequence) -> None:
        """Free `seq`'s slot; the slot decodes as padding again."""
        slot, seq.slot = seq.slot, -1
        self.sequences[slot] = None
        self.tokens[slot] = 0
        self.positions[slot] = self.max_seq_len
        self._sampling = {}

    def clear(self) -> list[Sequence]:
        """Release every slot; the sequences that held one."""
        running = self.running()
        for seq in running:
            self.release(seq)
        return running

    # -- reads --------------------------------------------------------------------------------

    def free(self) -> list[int]:
        return [slot for slot, s in enumerate(self.sequences) if s is None]

    def running(self) -> list[Sequence]:
        return [s for s in self.sequences if s is not None]

    def active(self) -> int:
        return sum(s is not None for s in self.sequences)

    # -- the scheduler thread's -----------------------------------------------------------------

    def advance(self, seq: Sequence, token: int) -> None:
        """`token` is `seq`'s new pending token (at `seq.position`)."""
        self.tokens[seq.slot] = token
        self.positions[seq.slot] = seq.position

    def decode_batch(self, rows: int, only: list[int] | None = None) -> DecodeBatch:
        """Inputs for a decode call of `rows` rows (`ModelRunner.decode_batch`). A full batch
        lists every slot in order (idle ones are padding) so it decodes in place; a smaller one
        lists the running slots, then padding rows with slot id max_batch. `only`: these
        running slots instead of all of them (one of several calls of a decode pass), then
        padding, whatever `rows` is."""
        max_batch = self.max_batch
        if only is None and rows == max_batch:
            order = tuple(range(max_batch))
        else:
            active = [slot for slot, s in enumerate(self.sequences) if s is not None] if only is None else only
            order = tuple(active + [max_batch] * (rows - len(active)))
        seqs = [self.sequences[s] if s < max_batch else None for s in order]
        if order not in self._sampling:
            if len(self._sampling) >= 4:  # a moving split point makes new orders: keep a few
                self._sampling.clear()
            self._sampling[order] = stack_sampling([s.sampling if s else IDLE_ROW for s in seqs], rows)
        slots = np.asarray(order, np.int32)
        positions = np.append(self.positions, self.max_seq_len)[slots]  # index max_batch: padding
        tokens = np.append(self.tokens, 0)[slots]
        # structured output: this step's masks, made anew each call (the cached rows stay free)
        constraints = [s.constraint if s else None for s in seqs]
        return DecodeBatch(order, slots, tokens, positions, with_masks(self._sampling[order], constraints))
