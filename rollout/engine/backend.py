"""The engine boundary: what a worker needs from an inference engine, and nothing more.

`rollout.engine.Engine` (the native JAX engine) and `rollout.engine.sglang` (an sglang-jax
Engine, Python >= 3.12) implement it. A backend plugs in by providing these members and one line in
BACKENDS (then `rollout.init(model, engine="<name>")` runs it); the worker, the sync protocol
and the tests of the weight state machine then apply to it unchanged. The worker builds its
engine with `engine_factory(FleetConfig.engine)`: the one place a backend is chosen.

What a backend cannot do (logprobs, scoring, LoRA adapters) it declares in `capabilities` (EngineCapabilities);
a backend without a `score` method cannot score, declared or not. `capabilities_of(engine)` is
the one place both are read: the worker refuses from it, and the coordinator refuses up front from
the same answer (a worker's ready reply), never by backend name.

Weight state machine (every backend): `stage(v, params)` validates and places a full update
beside the serving weights (raises and keeps nothing on any mismatch); `commit(v)` swaps it in at
a step boundary under the in-flight policy; `abort(v)` drops it. Versions only go forward. Both
built-in backends keep it in one implementation, `rollout.engine.weight_state.WeightState`, given
what holds their serving weights (a `SwapTarget`); tests/weight_contract.py pins it for any backend.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NotRequired, Protocol, TypedDict, runtime_checkable

from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion
from rollout.prompts import Prompt
from rollout.weights.spec import ParamSpec


class EngineStatus(TypedDict):
    """What `EngineBackend.status()` returns (a plain dict; workers add who they are to it)."""

    alive: bool  # False once the scheduler died: the worker restarts its process
    version: int  # committed (new requests run on it)
    serving_version: int  # swapped in (older while a drain finishes)
    staged_version: int | None
    queue_depth: int
    active_slots: int
    max_batch: int
    tokens_generated: int
    requests_finished: int
    swaps: int
    compiled: int  # programs compiled so far
    devices: int
    kv: NotRequired[dict[str, Any]]  # KV cache: "layout"; paged: pool use, shared pages, preemptions, prefix cache


class FeatureUnavailableError(ValueError):
    """A request asked for something the fleet's engine backend cannot do (EngineCapabilities)."""


@dataclasses.dataclass(frozen=True)
class EngineCapabilities:
    """What a backend can do beyond generating tokens and syncing weights. A backend declares it
    as its `capabilities` attribute (none declared: everything, as the native engine); the
    coordinator reads it once from a worker's ready reply and refuses what is missing before
    anything is queued, with the backend's own reason. The backend refuses it too (single
    process, no coordinator).

    >>> EngineCapabilities(unavailable={"score": "not here; use engine='native'"}).require("score")
    Traceback (most recent call last):
    ...
    rollout.engine.backend.FeatureUnavailableError: not here; use engine='native'
    """

    # feature ("logprobs": return_logprobs=True; "score": teacher-forced scoring) -> why it is
    # unavailable and what to do instead (the refusal's message)
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)

    def require(self, feature: str) -> None:
        """Raise FeatureUnavailableError (the backend's reason) unless `feature` is available."""
        if feature in self.unavailable:
            raise FeatureUnavailableError(self.unavailable[feature])


FULL_CAPABILITIES = EngineCapabilities()


def capabilities_of(engine: Any) -> EngineCapabilities:
    """What `engine` can do: its declared `capabilities` (everything when it declares none), less
    scoring when the backend has no `score` method (ScoringBackend) and LoRA adapters when it has
    no `stage_adapter` (AdapterBackend). The worker and the coordinator both refuse from this
    answer, so a refusal reads the same wherever it happens. (Anything that is not an
    EngineBackend is taken at its declaration.)"""
    declared: EngineCapabilities = getattr(engine, "capabilities", FULL_CAPABILITIES)
    if not isinstance(engine, EngineBackend):
        return declared
    missing = {}
    if "score" not in declared.unavailable and not isinstance(engine, ScoringBackend):
        missing["score"] = no_score_message(engine)
    if "lora" not in declared.unavailable and not isinstance(engine, AdapterBackend):
        missing["lora"] = no_lora_message(engine)
    if not missing:
        return declared
    return dataclasses.replace(declared, unavailable={**declared.unavailable, **missing})


def no_score_message(engine: Any) -> str:
    """Why a backend without a `score` method is refused scoring, and what to do instead."""
    return (
        f"score() is not available with the {type(engine).__name__} backend (it has no score method); "
        "score on a fleet with engine='native'"
    )


@runtime_checkable
class EngineBackend(Protocol):
    @property
    def spec(self) -> ParamSpec:
        """Paths, shapes and dtypes of the parameters an update must match."""

    @property
    def version(self) -> int:
        """The committed weight version (new requests run on it)."""

    @property
    def staged_version(self) -> int | None:
        """The version staged and not yet committed or aborted, if any."""

    def submit(
        self, prompt: Prompt, sampling: SamplingParams = ..., *, prompt_index: int = 0, return_logprobs: bool = True,
        sink: Any = None,
    ) -> Future[list[Completion]]:
        """Queue one prompt; the future yields its n completions. Bad requests raise here.
        `sink` (streaming): call `sink.update(sample)` whenever a sample gains tokens or finishes,
        before the future resolves (see rollout.engine.streaming.TokenSink for what it reads)."""

    def cancel(self, future: Future[list[Completion]]) -> bool:
        """Finish a submitted request early with finish_reason "abort"."""

    def stage(self, version: int, params: Any, *, finite_checked: bool = False) -> Any:
        """Validate and place a full update beside the serving weights (`finite_checked`: its
        values were already counted finite, so the backend may skip that pass)."""

    def stage_checkpoint(self, version: int, model: str | Path) -> Any:
        """Stage the weights of an HF checkpoint directory or repo id."""

    def commit(self, version: int, policy: str | None = None, *, wait: bool = False, timeout: float | None = None) -> int:
        """Swap the staged `version` in at the next step boundary."""

    def abort(self, version: int | None = None) -> bool:
        """Drop the staged update; False if there was none."""

    def status(self) -> EngineStatus:
        """Health and counters: alive, version, queue depth, active slots, tokens generated, ..."""

    def shutdown(self) -> None:
        """Stop serving; queued and running requests fail with EngineClosedError."""


@runtime_checkable
class ScoringBackend(Protocol):
    """A backend that also scores (per-token logprobs of given completions); optional: one that
    does not is refused scoring by `capabilities_of`."""

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], *, temperature: float = 1.0) -> Any:
        """Logprobs of each completion after its prompt on the committed version (a Scores).
        A backend that replays routes (capability "routed_experts", MoE models) also takes
        `routed_experts=` (one (prompt + completion - 1, MoE layers, top_k) array per pair); one
        that returns activations (capability "hidden_states") takes `return_hidden_states=`
        (layer indices) and fills Scores.hidden_states."""


def no_lora_message(engine: Any) -> str:
    """Why a backend without `stage_adapter` is refused LoRA adapter syncs, and what to do instead."""
    return (
        f"LoRA adapter syncs are not available with the {type(engine).__name__} backend (it has no "
        "stage_adapter method); sync the merged full weights instead, or run the fleet with engine='native'"
    )


@runtime_checkable
class AdapterBackend(Protocol):
    """A backend that also serves LoRA adapters (optional: one that does not is refused adapter
    syncs by `capabilities_of`, before any worker changes)."""

    def stage_adapter(self, version: int, adapter: Any, *, finite_checked: bool = False) -> Any:
        """Stage a LoRA adapter (rollout.weights.lora.LoraFactors or LoraAdapter) as `version`,
        merged onto the backend's resident base; committed and aborted like a full update."""


@runtime_checkable
class GeneratingBackend(EngineBackend, Protocol):
    """A backend that also generates for a batch of prompts in one blocking call (both built-in
    backends do); what the single-process CLI and the benchmarks use, not the worker."""

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingParams = ..., *, return_logprobs: bool = True,
        timeout: float | None = None,
    ) -> list[Completion]:
        """Completions of every prompt, ordered by (prompt_index, sample_index)."""


def generating_engine(engine: EngineBackend) -> GeneratingBackend:
    """`engine` as a GeneratingBackend, or a TypeError naming what it lacks."""
    if not isinstance(engine, GeneratingBackend):
        raise TypeError(f"{type(engine).__name__} has no generate(prompts, sampling); this command needs one")
    return engine


# (model: HF directory or repo id, config, the worker's devices) -> a started engine
EngineFactory = Callable[[str, Any, Sequence[Any]], EngineBackend]

# The backends a fleet can run, by the name given as `engine=` (FleetConfig.engine): "module:attr"
# of a callable with EngineFactory's signature, imported in the worker process only (so the
# driver never imports jax or a backend's dependencies). One line per backend.
BACKENDS: dict[str, str] = {
    "native": "rollout.engine.native.engine:Engine",
    "sglang-jax": "rollout.engine.sglang:create_engine",
}


def check_engine(engine: str | EngineFactory) -> None:
    """Raise ValueError unless `engine` names a registered backend or is a factory callable.

    >>> check_engine("native")
    """
    if isinstance(engine, str) and engine in BACKENDS:
        return
    if not isinstance(engine, str) and callable(engine):
        return
    raise ValueError(
        f"engine={engine!r}: expected a registered backend, one of {sorted(BACKENDS)}, or a callable "
        "(model, EngineConfig, devices) -> EngineBackend; a new backend is registered in "
        "rollout.engine.backend.BACKENDS"
    )


def engine_factory(engine: str | EngineFactory) -> EngineFactory:
    """The factory of `engine` (a registered name, imported now; or a factory, returned as is)."""
    check_engine(engine)
    if not isinstance(engine, str):
        return engine
    module, attr = BACKENDS[engine].split(":")
    return getattr(importlib.import_module(module), attr)
