"""A backend's weight versions: stage -> commit (or abort), and the swap a commit hands over.

- `committed`: the latest committed version; new requests run on it or a newer one.
- `serving`: the version the backend serves now (behind `committed` until the swap is applied).
- `staged`: at most one placed copy beside the serving weights, not yet committed.
- `pending`: a committed copy waiting for the backend's next allowed step boundary.

One state machine for every backend: what it needs from one is a `SwapTarget` (the native
engine's runner; sglang-jax's model state), which derives a copy's serving-only leaves and
serves a copy when the swap is applied. `stage` is one path for every source of weights (a tree,
a checkpoint): versions only go forward, the copy is built and placed without the lock (serving
goes on), and a stage that a commit of its version or a newer one overtook meanwhile is refused.
All four fields change under the backend's lock (the native engine's: see
`rollout.engine.native.engine`); `serving` only from the thread that runs the model, between steps.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import jax

from rollout.engine.staging import Derived, StagedWeights
from rollout.engine.types import WeightSyncError

P = TypeVar("P")  # a backend's placed parameters: native {path: array}; sglang-jax its state leaves


class SwapTarget(Protocol[P]):
    """What the weight state needs from a backend. `ModelRunner` / `PagedRunner` (native) and
    `sglang.state.ModelState` provide it."""

    @property
    def params(self) -> P | None:
        """The serving parameters (None before the first `set_params`)."""
        ...

    @property
    def derived(self) -> Derived:
        """Serving-only leaves made from `params` (see `derive`)."""
        ...

    def derive(self, params: P) -> Derived:
        """Serving-only leaves of a staged copy (made while staging, off the swap's critical path)."""
        ...

    def set_params(self, params: P, derived: Derived | None = None) -> None:
        """Serve `params` from the next step on: the swap (called between steps)."""
        ...


@dataclasses.dataclass(frozen=True)
class PendingSwap(Generic[P]):
    weights: StagedWeights[P]
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


class WeightState(Generic[P]):
    def __init__(self, lock: threading.Condition, target: SwapTarget[P], stopped: Callable[[], bool] = lambda: False):
        self._lock = lock  # the backend's lock; waiters on it are woken at each commit and swap
        self._target = target
        self._stopped = stopped  # the backend stopped serving: a `wait_serving` gives up (under the lock)
        self.committed = 0
        self.serving = 0
        self.staged: StagedWeights[P] | None = None
        self.pending: PendingSwap[P] | None = None
        self.swaps = 0

    @property
    def staged_version(self) -> int | None:
        staged = self.staged
        return None if staged is None else staged.version

    def stage(
        self, version: int, build: Callable[[], P], derive: Callable[[P], Derived] | None = None
    ) -> StagedWeights[P]:
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
        derived = jax.block_until_ready((derive or self._target.derive)(params))
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

    def commit(self, version: int, policy: str, *, wait: bool = False, timeout: float | None = None) -> int:
        """Hand the staged `version` to the backend's model thread; with `wait`, block until it
        serves it (`wait_serving`). Committing the current version again is a no-op (retries)."""
        with self._lock:
            staged = self.staged
            if staged is not None and staged.version == version:
                self.pending = PendingSwap(staged, policy)
                self.staged = None
                self.committed = version
                self._lock.notify_all()
            elif version != self.committed:
                raise WeightSyncError(
                    f"cannot commit version {version}: it was not staged (staged: {self.staged_version}, "
                    f"committed: {self.committed}); call stage({version}, params) first"
                )
        if wait:
            self.wait_serving(version, timeout)
        return version

    def wait_serving(self, version: int, timeout: float | None) -> None:
        """Block until `version` (or a newer one) is served, or the backend stops serving."""
        with self._lock:
            ok = self._lock.wait_for(lambda: self.serving >= version or self._stopped(), timeout)
        if not ok:
            raise TimeoutError(f"version {version} was committed but not swapped in within {timeout}s")

    def abort(self, version: int | None = None) -> bool:
        """Drop the staged copy (of `version`, or whatever is staged). True if one was dropped."""
        with self._lock:
            if self.staged is not None and (version is None or self.staged.version == version):
                self.staged = None
                return True
            return False

    def snapshot(self) -> tuple[int, P, Derived] | None:
        """(version, params, derived) of the committed version, or None while its swap is being
        applied. A committed update not yet swapped in is taken from its staged copy. Call with
        the lock held."""
        if self.pending is not None:
            staged = self.pending.weights
            return staged.version, staged.params, staged.derived
        if self.serving == self.committed:
            params = self._target.params
            assert params is not None, "set_params() before serving"
            return self.serving, params, self._target.derived
        return None

    # -- the model thread's (the scheduler), between steps ---------------------------------------

    def take_swap(self, running: bool) -> PendingSwap[P] | None:
        """The pending swap if it may be applied now (`drain` waits until nothing is `running`).
        Under the lock."""
        swap = self.pending
        if swap is None or (swap.policy == "drain" and running):
            return None
        self.pending = None
        return swap

    def apply(self, swap: PendingSwap[P]) -> None:
        """Serve the swap's copy (without the lock: the target is the model thread's), then record
        its version as served and wake `wait_serving`."""
        self._target.set_params(swap.weights.params, swap.weights.derived)  # the old leaves go here
        with self._lock:
            self.serving = swap.weights.version
            self.swaps += 1
            self._lock.notify_all()


class WeightVersions:
    """The backend protocol's version properties, read from the backend's `_weights` (its
    WeightState): one definition for every backend."""

    _weights: WeightState[Any]

    @property
    def version(self) -> int:
        """The latest committed version (new requests are served by it or a newer one)."""
        return self._weights.committed

    @property
    def serving_version(self) -> int:
        """The version the model holds now (behind `version` until the swap is applied)."""
        return self._weights.serving

    @property
    def staged_version(self) -> int | None:
        """The staged, not yet committed version, if any."""
        return self._weights.staged_version
