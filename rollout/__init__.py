"""rollout: a distributed RL rollout service with live weight sync, on Ray and JAX.

    import rollout

    rollout.init("Qwen/Qwen3-0.6B", num_workers=2, devices_per_worker=4)
    version = rollout.sync_weights(params)     # pytree, {hf_name: array}, or HF dir / repo id
    version = rollout.sync_weights(rollout.LoraAdapter.from_peft_dir("adapter/"))  # only the adapter
    outs = rollout.generate(prompts, sampling=rollout.SamplingParams(n=8, max_tokens=256))
    traj = rollout.Trajectory(tokenizer, messages)   # multi-turn agents, token-exact (rollout.trajectory)
    for c in rollout.generate_async(prompts):  # completions as prompts finish (or `async for`)
        ...
    scores = rollout.score(prompts, completions)   # per-token logprobs of given token ids
    rollout.status()
    rollout.shutdown()

    server = rollout.serve(model_or_service, port=8000)   # OpenAI-compatible HTTP ([serve] extra)

`rollout.RolloutService(...)` is the same as an object (and a context manager); the module-level
functions drive a default service made by `init`. Importing this package is cheap: it imports
neither jax nor torch nor Ray; the service and the engine load them when first used.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rollout.engine.config import EngineConfig
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import Completion, EngineClosedError, WeightSyncError
from rollout.errors import PlacementError, ServiceClosedError, SyncError, WorkerStartError, WorkerUnavailableError
from rollout.fleet_config import FleetConfig
from rollout.scores import Scores
from rollout.trajectory import TemplateNotPrefixStableError, Trajectory
from rollout.weights.finite import NonFiniteWeightsError
from rollout.weights.lora import LoraAdapter, LoraAdapterError, LoraConfig
from rollout.weights.spec import SpecMismatchError

if TYPE_CHECKING:
    from rollout.coordinator.dispatch import GenerationStream
    from rollout.coordinator.service import RolloutService

__all__ = [
    "Completion",
    "EngineClosedError",
    "EngineConfig",
    "FleetConfig",
    "GenerationStream",
    "LoraAdapter",
    "LoraAdapterError",
    "LoraConfig",
    "NonFiniteWeightsError",
    "PlacementError",
    "RolloutService",
    "SamplingParams",
    "Scores",
    "ServiceClosedError",
    "SpecMismatchError",
    "SyncError",
    "TemplateNotPrefixStableError",
    "Trajectory",
    "WeightSyncError",
    "WorkerStartError",
    "WorkerUnavailableError",
    "generate",
    "generate_async",
    "init",
    "score",
    "serve",
    "shutdown",
    "status",
    "sync_weights",
]

_LAZY = {"RolloutService": "rollout.coordinator.service", "GenerationStream": "rollout.coordinator.dispatch"}
_default: RolloutService | None = None
_default_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")


def init(
    model: str,
    num_workers: int = FleetConfig.num_workers,
    devices_per_worker: int = FleetConfig.devices_per_worker,
    **options: Any,
) -> RolloutService:
    """Start the default rollout service and return it.

    The arguments are RolloutService's: the fields of FleetConfig and EngineConfig (load_format,
    dtype, max_batch, max_seq_len, swap_policy, accelerator, engine ("native" or
    "sglang-jax", see rollout.engine.backend.BACKENDS), bucket_bytes, ...), each defaulting
    to its field's default. Starts a local Ray, listening on loopback only, if none is initialized;
    otherwise joins it (e.g. after `ray.init(address="auto")`).
    """
    global _default
    from rollout.coordinator.service import RolloutService

    with _default_lock:
        if _default is not None and not _default.closed:
            raise RuntimeError(
                "rollout.init was already called and its service is running; call "
                "rollout.shutdown() first, or create more services with rollout.RolloutService(...)"
            )
        _default = RolloutService(model, num_workers, devices_per_worker, **options)
        return _default


def _service() -> RolloutService:
    service = _default
    if service is None or service.closed:
        raise ServiceClosedError("no rollout service is running; call rollout.init(model, ...) first")
    return service


def sync_weights(params: Any) -> int:
    """Push new weights to the fleet; returns the new version. See RolloutService.sync_weights."""
    return _service().sync_weights(params)


def generate(
    prompts: Sequence[Any],
    sampling: SamplingParams = SamplingParams(),
    *,
    return_logprobs: bool = True,
    timeout: float | None = None,
) -> list[Completion]:
    """Completions in input order (each prompt's n samples). See RolloutService.generate."""
    return _service().generate(prompts, sampling, return_logprobs=return_logprobs, timeout=timeout)


def generate_async(
    prompts: Sequence[Any],
    sampling: SamplingParams = SamplingParams(),
    *,
    return_logprobs: bool = True,
    timeout: float | None = None,
) -> GenerationStream:
    """A stream of completions as prompts finish (`for` or `async for`).
    See RolloutService.generate_async."""
    return _service().generate_async(prompts, sampling, return_logprobs=return_logprobs, timeout=timeout)


def serve(model: Any, **options: Any) -> Any:
    """Start a fleet (or use a RolloutService) and an OpenAI-compatible HTTP server on it;
    returns the running server (`url`, `service`, `shutdown()`). Needs the `serve` extra
    (`pip install "rollout[serve]"`). See rollout.server.handle.serve for the options."""
    try:
        from rollout.server import serve as _serve
    except ImportError as err:
        raise ImportError(
            f"rollout.serve needs the server libraries ({err.name} is missing); install them with "
            '`pip install "rollout[serve]"`'
        ) from err
    return _serve(model, **options)


def score(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    temperature: float = 1.0,
    timeout: float | None = None,
    routed_experts: Sequence[Any] | None = None,
    return_hidden_states: Sequence[int] | None = None,
) -> Scores:
    """Per-token logprobs of each completion (token ids) after its prompt, teacher-forced, on one
    weight version (returned with them); `routed_experts` (MoE models, from
    Completion.routed_experts) are replayed; `return_hidden_states=[layer indices]` (dense
    models) also returns the residual stream at those layers. See RolloutService.score."""
    return _service().score(
        prompts, completions, temperature=temperature, timeout=timeout, routed_experts=routed_experts,
        return_hidden_states=return_hidden_states,
    )


def status() -> dict[str, Any]:
    """Workers (version, queue, slots, tokens, restarts) and recent syncs (phase timings)."""
    return _service().status()


def shutdown() -> None:
    """Stop the default service (a no-op if none is running)."""
    global _default
    with _default_lock:
        service, _default = _default, None
    if service is not None:
        service.shutdown()
