"""The engine's weight versions: stage -> commit (or abort), and the swap a commit hands over.

- `committed`: the latest committed version; new requests run on it or a newer one.
- `serving`: the version the runner holds now (behind `committed` until the swap is applied).
- `staged`: at most one placed copy beside the serving weights, not yet committed.
- `pending`: a committed copy waiting for the scheduler's next allowed step boundary.

`stage` is one path for every source of weights (a tree, a checkpoint): versions only go
forward, the copy is built and placed without the lock (serving goes on), and a stage that a
commit of its version or a newer one overtook meanwhile is refused. All four fields change under
the engine's lock (see `rollout.engine.native.engine`); `serving` only from the scheduler thread.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import jax

from rollout.engine.native.runner import Derived, Params
from rollout.engine.native.runner_api import Runner
from rollout.engine.staging import StagedWeights
from rollout.engine.types import WeightSyncError


@dataclasses.dataclass(frozen=True)
class PendingSwap:
    weights: StagedWeights
    policy: str  # drain | recompute | continue


def check_stage_version(version: object, committed: int, staged: int | None) -> None:
    """Versions only go forward: a stage must be newer than the committed version and not older
    than the one already staged (the same version again is a retry and replaces it)."""
    if not isinstance(version, int) or isinstance(version, bool) or version <= committed:
        raise WeightSyncError(
            f"cannot stage version {version!r}: versions only go forward and version "
            f"{committed} is already committed; stage a larger version"
        )
    if staged is not None and version < staged:
        raise WeightSyncError(
            f"cannot stage version {version}: version {staged} is already staged and versions only go "
            f"forward; commit or abort {staged} first, or stage a version >= {staged}"
        )


class WeightState:
    def __init__(self, lock: threading.Condition, runner: Runner):
        self._lock = lock
        self._runner = runner  # makes each copy's serving-only leaves (Runner.derive)
        self.committed = 0
        self.serving = 0
        self.staged: StagedWeights | None = None
        self.pending: PendingSwap | None = None
        self.swaps = 0

    @property
    def staged_version(self) -> int | None:
        staged = self.staged
        return None if staged is None else staged.version

    def stage(
        self, version: int, build: Callable[[], Params], derive: Callable[[Params], Derived] | None = None
    ) -> StagedWeights:
        """Stage the parameters `build()` places as `version`; a newer stage (or a retry of the same
        version) replaces the staged copy, an older one is refused.

        On any error (`build`'s included) nothing changes. The serving-only leaves are derived
        here too, off the swap's critical path (`derive`: instead of the runner's, e.g. a LoRA
        adapter that leaves the leaves they come from as they are).
        """
        with self._lock:
            check_stage_version(version, self.committed, self.staged_version)
        start = time.perf_counter()
        params = jax.block_until_ready(build())
        derived = jax.block_until_ready((derive or self._runner.derive)(params))
        staged = StagedWeights(version, params, derived, time.perf_counter() - start)
        with self._lock:
            if version <= self.committed:
                raise WeightSyncError(
                    f"version {version} was overtaken by the commit of version {self.committed} while "
                    "it was staged; stage a larger version"
                )
            check_stage_version(version, self.committed, self.staged_version)  # a newer stage meanwhile
            self.staged = staged  # drops any older staged copy: one staged copy at most
        return staged

    def commit(self, version: int, policy: str) -> None:
        """Hand the staged `version` to the scheduler. Committing the current version again is a
        no-op (retries)."""
        with self._lock:
            staged = self.staged
            if staged is None or staged.version != version:
                if version == self.committed:
                    return
                raise WeightSyncError(
                    f"cannot commit version {version}: it was not staged (staged: {self.staged_version}, "
                    f"committed: {self.committed}); call stage({version}, params) first"
                )
            self.pending = PendingSwap(staged, policy)
            self.staged = None
            self.committed = version
            self._lock.notify_all()

    def abort(self, version: int | None = None) -> bool:
        """Drop the staged copy (of `version`, or whatever is staged). True if one was dropped."""
        with self._lock:
            if self.staged is not None and (version is None or self.staged.version == version):
                self.staged = None
                return True
            return False

    def snapshot(self) -> tuple[int, Params, Derived] | None:
        """(version, params, derived) of the committed version, or None while its swap is being
        applied. A committed update not yet swapped in is taken from its staged copy. Call with
        the lock held."""
        if self.pending is not None:
            staged = self.pending.weights
            return staged.version, staged.params, staged.derived
        if self.serving == self.committed:
            params = self._runner.params
            assert params is not None, "set_params() before serving"
            return self.serving, params, self._runner.derived
        return None

    # -- the scheduler thread's, under the lock ------------------------------------------------

    def take_swap(self, running: bool) -> PendingSwap | None:
        """The pending swap if it may be applied now (`drain` waits until nothing is `running`)."""
        swap = self.pending
        if swap is None or (swap.policy == "drain" and running):
            return None
        self.pending = None
        return swap

    def swapped(self, version: int) -> None:
        """The runner serves `version` now."""
        self.serving = version
        self.swaps += 1
        self._lock.notify_all()
