"""How the RL loop reaches the rollout: the Ray fleet or one in-process engine.

`RolloutClient` is the calls the loop makes. `FleetClient` drives the fleet through the
module-level `rollout.init / sync_weights / generate`; `LocalEngineClient` drives one engine of
the chosen backend in this process (no Ray), with the same stage + commit per sync that each fleet
worker runs. Both say what the backend cannot do (`capabilities`, declared by the backend).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol, cast

from rollout.coordinator.fleet import service_configs
from rollout.engine.backend import (
    AdapterBackend,
    EngineCapabilities,
    capabilities_of,
    engine_factory,
    generating_engine,
)
from rollout.engine.config import EngineConfig
from rollout.fleet_config import FleetConfig


class RolloutClient(Protocol):
    """The calls the loop makes; the fleet and a local engine both provide them."""

    @property
    def capabilities(self) -> EngineCapabilities:
        """What the engine backend cannot do (e.g. return logprobs), as the backend declares it."""
        ...

    def sync_weights(self, params: Any) -> int: ...

    def generate(self, prompts: Sequence[Any], sampling: Any, return_logprobs: bool = True) -> list: ...

    def status(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class FleetOptions:
    """How to start the rollout (fleet or local engine). Per-worker sizes.

    Every field but `worker_logs` is a rollout.init option of the same name; those that keep
    rollout's default read it from FleetConfig / EngineConfig, the others say why they differ.
    """

    num_workers: int = FleetConfig.num_workers
    devices_per_worker: int = 2  # the demo runs on a 2-core machine: 2 x 2 simulated devices
    max_batch: int = EngineConfig.max_batch  # decode slots per worker; >= prompts x group size avoids queueing
    max_seq_len: int = 128  # the toy task's prompt + completion tokens: a small KV cache
    dtype: str = EngineConfig.dtype  # float32 keeps the logprob check at ~1e-6; bfloat16 would be ~1e-2
    load_format: str = "dummy"  # the loop's first sync brings the real weights anyway
    accelerator: str = "cpu"  # the demo's Ray is local; "auto" would also pick cpu there
    engine: str = str(FleetConfig.engine)  # the engine backend, a name in rollout.engine.backend.BACKENDS (FleetConfig's default)
    batch_invariant: bool = EngineConfig.batch_invariant  # bitwise logprobs (rollout.models.invariant)
    quantization: str | None = EngineConfig.quantization  # "int8": the engines serve int8 weights (the trainer corrects with TIS)
    worker_logs: bool = False  # the client's own: stream the workers' logs (noisy under a progress bar)

    def engine_config(self) -> EngineConfig:
        """The EngineConfig these options give (every engine field not set here keeps its default)."""
        return service_configs(self.service_options())[1]

    def service_options(self) -> dict[str, Any]:
        """The rollout.init keyword options."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "worker_logs"}


class FleetClient:
    """The Ray fleet through the public module-level API.

    If no Ray is running, it starts a local one first (no dashboard; worker logs off unless
    `worker_logs`; on CPU at least one Ray CPU per worker, so `--workers 4` also runs on a
    2-core machine), which `rollout.init` then joins, and stops it at shutdown.
    """

    def __init__(self, model: str | os.PathLike[str], options: FleetOptions = FleetOptions()):
        import ray

        import rollout
        from rollout.local_ray import start_local_ray

        self._rollout = rollout
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            cpus: dict[str, Any] = {"num_cpus": max(os.cpu_count() or 1, options.num_workers)} if options.accelerator == "cpu" else {}
            start_local_ray(include_dashboard=False, log_to_driver=options.worker_logs, **cpus)
        self._service = rollout.init(model=str(model), **options.service_options())

    @property
    def capabilities(self) -> EngineCapabilities:
        return self._service.capabilities

    def sync_weights(self, params: Any) -> int:
        return self._rollout.sync_weights(params)

    def generate(self, prompts: Sequence[Any], sampling: Any, return_logprobs: bool = True) -> list:
        return self._rollout.generate(prompts, sampling=sampling, return_logprobs=return_logprobs)

    def status(self) -> dict[str, Any]:
        return self._rollout.status()

    def shutdown(self) -> None:
        self._rollout.shutdown()
        if self._owns_ray:
            import ray

            ray.shutdown()


class LocalEngineClient:
    """One in-process engine of `options.engine`'s backend on the first `devices_per_worker`
    local devices (no Ray).

    sync_weights = stage(next version) + commit(wait=True), the protocol the fleet runs per worker.
    """

    def __init__(self, model: str | os.PathLike[str], options: FleetOptions = FleetOptions()):
        import jax

        devices = jax.devices()[: options.devices_per_worker]
        if len(devices) < options.devices_per_worker:
            raise RuntimeError(
                f"devices_per_worker={options.devices_per_worker} but this process has "
                f"{len(jax.devices())} device(s); on CPU set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={options.devices_per_worker} before jax is imported"
            )
        self.engine = generating_engine(engine_factory(options.engine)(str(model), options.engine_config(), devices))

    @property
    def capabilities(self) -> EngineCapabilities:
        return capabilities_of(self.engine)

    def sync_weights(self, params: Any) -> int:
        from rollout.weights.lora import LoraAdapter

        version = self.engine.version + 1
        if isinstance(params, LoraAdapter):
            self.capabilities.require("lora")
            cast(AdapterBackend, self.engine).stage_adapter(version, params)
        else:
            self.engine.stage(version, params)
        return self.engine.commit(version, wait=True)

    def generate(self, prompts: Sequence[Any], sampling: Any, return_logprobs: bool = True) -> list:
        return self.engine.generate(prompts, sampling, return_logprobs=return_logprobs)

    def status(self) -> dict[str, Any]:
        return dict(self.engine.status())

    def shutdown(self) -> None:
        self.engine.shutdown()


def make_client(backend: str, model: str | os.PathLike[str], options: FleetOptions) -> RolloutClient:
    """backend "fleet" (Ray workers) or "local" (one engine in this process)."""
    if backend == "fleet":
        return FleetClient(model, options)
    if backend == "local":
        return LocalEngineClient(model, options)
    raise ValueError(f"backend={backend!r}: expected 'fleet' or 'local'")


def configure_devices(devices: int, platform: str | None = None) -> None:
    """Let this process simulate `devices` CPU devices (harmless on TPU/GPU hosts) and, if given,
    pin the JAX platform. Must run before jax is imported; later it does nothing."""
    if "jax" in sys.modules:
        return  # too late to change; LocalEngineClient will say so if there are too few
    if platform:
        os.environ.setdefault("JAX_PLATFORMS", platform)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
