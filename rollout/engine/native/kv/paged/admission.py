"""Admission for the paged scheduler: will the pool hold what its sequences are still to write?

All running sequences decode together, one token per step, so the pool's future is a timeline:
each sequence grows a page every `page_size` tokens until it ends, then gives its pages back.
`PoolPlan` projects that timeline for the running sequences plus the candidates of an admission
and admits them only if its peak fits the pool. The peak comes just before some sequence ends
(its pages only grow until then), so only those instants are evaluated.

Where a sequence ends is not known (EOS); `LengthEstimate` supplies a planned end, a
heuristic: the current position plus `ratio` x the tokens its max_tokens still allows (at least
one decode call). The ratio is learned: generated / max_tokens, token-weighted, over recently
finished sequences (0.7 before any has finished). It is a share of the whole budget applied to
what is left of it, so a sequence that has already run long is planned short of where such
sequences tend to end; a preemption says the plan was too low: the ratio goes to 1 at once and
comes back down to the learned value by 0.01 per decode pass. `EngineConfig.kv_admission_ratio`
fixes the ratio instead (1: admit only what can run to max_tokens without a preemption; 0:
reserve only the next decode call's pages, over-admitting under pressure: preemptions
recompute their context). Two admissions bypass the plan, so even a ratio of 1 can preempt: a
request that comes to an idle engine is admitted when its prompt pages fit (its n samples may
outgrow the pool: they then preempt each other), and a `recompute` swap re-admits each running
sequence on its own (shared prompt pages become private copies).

Why: reserving only the next call's growth, 64 prompts x 8 samples of a long-tailed length mix
over a pool that holds ~17 full-length sequences kept preempting and recomputing, and ran
slower than the contiguous layout on the same memory; reserving every sequence's whole
max_tokens would leave most of the pool idle on RL workloads whose samples mostly stop early.

Shared prompt pages are counted as a fraction (1 / holders) of each holder, so a group's prompt
pages leave the plan when its samples end, and an n = 1 request's prompt pages are its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

PRIOR_RATIO = 0.7  # before any sequence finished: most RL samples stop before max_tokens
MEMORY = 0.98  # weight of the past per finished sequence in the learned ratio (~50 sequences)
PRESSURE_DECAY = 0.01  # per decode pass: the way back from 1 to the learned ratio after a preemption


@dataclasses.dataclass
class LengthEstimate:
    """The planned end of a running sequence (see the module docstring). Scheduler thread only."""

    fixed: float | None = None  # EngineConfig.kv_admission_ratio: no learning
    generated: float = 0.0  # decayed sums over finished sequences
    budget: float = 0.0
    pressure: float = 0.0  # 1 at a preemption, decaying

    @property
    def ratio(self) -> float:
        if self.fixed is not None:
            return self.fixed
        learned = self.generated / self.budget if self.budget else PRIOR_RATIO
        return min(1.0, max(learned, self.pressure))

    def end(self, position: int, limit: int, steps: int) -> int:
        """Planned final length of a sequence at `position` that may run to `limit` positions.

        >>> LengthEstimate(fixed=0.5).end(100, 300, 8), LengthEstimate(fixed=0.0).end(100, 300, 8)
        (200, 108)
        """
        remaining = max(0, limit - position)
        return position + max(min(remaining, steps), math.ceil(self.ratio * remaining))

    def finished(self, generated: int, max_tokens: int) -> None:
        """A sequence ended by itself (stop or length) after `generated` of `max_tokens` tokens."""
        self.generated = MEMORY * self.generated + generated
        self.budget = MEMORY * self.budget + max_tokens

    def preempted(self) -> None:
        self.pressure = 1.0

    def decoded(self) -> None:
        """One decode pass ran (one call, or two when short rows are split from long ones)."""
        self.pressure = max(0.0, self.pressure - PRESSURE_DECAY)


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One sequence in a `PoolPlan`."""

    position: int  # positions in its KV now (or after its admission's prefill)
    end: int  # planned final length (LengthEstimate.end)
    prefix: int  # leading pages of its table shared with other sequences
    prefix_share: float  # its share of those: sum of 1 / holders
    own: int  # pages of its table held by it alone


class PoolPlan:
    """The projected page use of a set of sequences decoding together (module docstring).

    >>> plan = PoolPlan(num_pages=10, page_size=4, steps=1)
    >>> plan.admit([PlanRow(position=4, end=12, prefix=0, prefix_share=0.0, own=1)])  # peaks at 3 pages
    True
    >>> plan.peak([PlanRow(position=4, end=40, prefix=0, prefix_share=0.0, own=1)])  # 3 + 3 at t=7, then 10 alone
    10.0
    """

    def __init__(self, num_pages: int, page_size: int, steps: int):
        self.num_pages, self.page_size, self.steps = num_pages, page_size, steps
        self.rows: list[PlanRow] = []

    def peak(self, extra: Sequence[PlanRow] = ()) -> float:
        rows = self.rows + list(extra)
        if not rows:
            return 0.0
        position = np.array([r.position for r in rows])
        end = np.array([r.end for r in rows])
        prefix = np.array([r.prefix for r in rows])
        share = np.array([r.prefix_share for r in rows])
        own = np.array([r.own for r in rows])
        left = np.maximum(end - position, 1)  # steps until it ends
        times = np.unique(np.concatenate([[0], left - 1]))[:, None]  # (T, 1): the last step of each
        covered = np.minimum(position + times + self.steps, np.maximum(end, position))  # (T, rows)
        pages = np.maximum(own, -(-covered // self.page_size) - prefix) + share
        return float(np.max(np.sum(np.where(left > times, pages, 0.0), axis=1)))

    def admit(self, rows: list[PlanRow], *, force: bool = False) -> bool:
        """Add `rows` if the projected peak with them fits the pool; False (nothing added) if not.
        `force`: add them unchecked (an admission that bypasses the plan, still planned for)."""
        if not force and self.peak(rows) > self.num_pages + 1e-6:
            return False
        self.rows += rows
        return True
