"""FakeEngine: an EngineBackend without jax, for testing what sits around an engine (the worker
host) without compiling anything.

Its weights are host numpy arrays of a given spec; it keeps the weight state machine of every
backend (stage validates and copies a full update, commit swaps, abort drops, versions only go
forward). A request completes at once with one token per sample: the committed version, so a
test sees which weights answered; a streamed request (`sink`) gets that token through its sink
first, as the scheduler streams it. `hold_stage()` makes the next stage wait until released, to
catch a worker in the middle of staging. `FakeScoringEngine` also scores: the logprob of each
completion token is minus the committed version.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from rollout.engine.backend import EngineStatus
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion, EngineClosedError, WeightSyncError
from rollout.scores import Scores
from rollout.weights.spec import ParamSpec


@dataclasses.dataclass
class _Text:
    text: str = ""
    cut: bool = False


@dataclasses.dataclass
class _Sample:
    """What a TokenSink reads of a sample (the engine's Sequence has the same fields)."""

    index: int
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str | None
    text: _Text = dataclasses.field(default_factory=_Text)


class FakeEngine:
    def __init__(self, spec: ParamSpec, params: dict[str, np.ndarray], *, answer: bool = True):
        self._spec = spec
        self.params = {p: np.array(a) for p, a in params.items()}
        self._version = 0
        self._staged: tuple[int, dict[str, np.ndarray]] | None = None
        self._answer = answer  # False: requests stay queued until cancelled or shut down
        self._queued: list[Future[list[Completion]]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._stage_gate: threading.Event | None = None
        self.stage_entered = threading.Event()
        self.cancelled = 0

    @property
    def spec(self) -> ParamSpec:
        return self._spec

    @property
    def version(self) -> int:
        return self._version

    @property
    def staged_version(self) -> int | None:
        return None if self._staged is None else self._staged[0]

    def submit(
        self, prompt: Any, sampling: SamplingParams = SamplingParams(), *, prompt_index: int = 0,
        return_logprobs: bool = True, sink: Any = None,
    ) -> Future[list[Completion]]:
        if self._closed:
            raise EngineClosedError("the engine was shut down")
        future: Future[list[Completion]] = Future()
        if self._answer:
            completions = [self._completion(prompt, prompt_index, i, "length") for i in range(sampling.n)]
            for c in completions if sink is not None else ():  # before the future resolves, as the scheduler does
                sink.update(_Sample(c.sample_index, list(c.token_ids), [0.0] * len(c.token_ids),
                                    list(c.token_versions), c.finish_reason))
            future.set_result(completions)
        else:
            self._queued.append(future)
        return future

    def _completion(self, prompt: Any, prompt_index: int, sample: int, reason: str) -> Completion:
        tokens = (self._version,) if reason == "length" else ()
        return Completion(prompt_index, sample, tuple(prompt), tokens, "", None, reason, self._version,
                          (self._version,) * len(tokens))

    def cancel(self, future: Future[list[Completion]]) -> bool:
        if future in self._queued:
            self._queued.remove(future)
            self.cancelled += 1
            future.set_result([self._completion((), 0, 0, "abort")])
            return True
        return False

    def hold_stage(self) -> threading.Event:
        """The next stage waits (after reading its leaves) until the returned event is set."""
        self._stage_gate = threading.Event()
        return self._stage_gate

    def stage(self, version: int, params: Any, *, finite_checked: bool = False) -> Any:
        self._check_forward(version)
        self._spec.check(ParamSpec.of(params), cast_floats=False)
        staged = {leaf.path: np.array(params[leaf.path]) for leaf in self._spec.leaves}  # reads in spec order
        self.stage_entered.set()
        if self._stage_gate is not None:
            gate, self._stage_gate = self._stage_gate, None
            gate.wait(30)
        with self._lock:
            self._staged = (version, staged)
        return staged

    def stage_checkpoint(self, version: int, model: str | Path) -> Any:
        """Stage an .npz file of {path: array} (the fake's checkpoint format)."""
        self._check_forward(version)
        with np.load(model) as npz:
            return self.stage(version, {p: npz[p] for p in npz.files})

    def _check_forward(self, version: int) -> None:
        if version <= self._version:
            raise WeightSyncError(f"cannot stage version {version}: versions only go forward ({self._version} committed)")

    def commit(self, version: int, policy: str | None = None, *, wait: bool = False, timeout: float | None = None) -> int:
        with self._lock:
            if self._staged is None or self._staged[0] != version:
                raise WeightSyncError(f"cannot commit version {version}: it was not staged")
            self._version, self.params = self._staged
            self._staged = None
        return version

    def abort(self, version: int | None = None) -> bool:
        with self._lock:
            if self._staged is not None and (version is None or self._staged[0] == version):
                self._staged = None
                return True
            return False

    def status(self) -> EngineStatus:
        return EngineStatus(
            alive=not self._closed, version=self._version, serving_version=self._version,
            staged_version=self.staged_version, queue_depth=len(self._queued), active_slots=0, max_batch=8,
            tokens_generated=0, requests_finished=0, swaps=0, compiled=0, devices=1,
        )

    def shutdown(self) -> None:
        self._closed = True
        for future in self._queued:
            future.set_exception(EngineClosedError("the engine was shut down"))
        self._queued.clear()


class FakeScoringEngine(FakeEngine):
    """A FakeEngine that also scores: each completion token's logprob is minus the committed version."""

    def score(self, prompts: Any, completions: Any, *, temperature: float = 1.0) -> Scores:
        version = self._version
        return Scores(tuple(np.full(len(c), -float(version), np.float32) for c in completions), version)
