"""The fleet: how many workers, on which accelerators, and whether the cluster can host them.

Pure functions of resource dicts (no Ray import), so placement is checked and explained before
any actor exists:

    cfg = FleetConfig(num_workers=2, devices_per_worker=4, accelerator="tpu")
    worker_resources(cfg, "tpu")        # {'CPU': 1.0, 'TPU': 4}: what one worker asks Ray for
    check_placement(cfg, "tpu", nodes)  # PlacementError saying what is missing, or None

On CPU each worker simulates `devices_per_worker` devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N, set in the actor's runtime_env so it is in
place before jax is imported in the worker process.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rollout.engine.config import EngineConfig
from rollout.errors import PlacementError
from rollout.fleet_config import FleetConfig
from rollout.worker.cpu_malloc import CPU_MALLOC

_PASSED_THROUGH = (
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
)
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


FLEET_OPTIONS = tuple(f.name for f in dataclasses.fields(FleetConfig))
ENGINE_OPTIONS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def service_configs(options: Mapping[str, Any]) -> tuple[FleetConfig, EngineConfig]:
    """The keyword options of `rollout.init` / `RolloutService` -> (FleetConfig, EngineConfig).

    The options are exactly the fields of the two dataclasses, and an option not given keeps
    its field's default: the one definition of every default.

    >>> fleet, engine = service_configs({"num_workers": 3, "max_batch": 8})
    >>> fleet.num_workers, fleet.devices_per_worker, engine.max_batch, engine.max_seq_len
    (3, 4, 8, 2048)
    """
    unknown = sorted(set(options) - set(FLEET_OPTIONS) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}; expected fields of FleetConfig {sorted(FLEET_OPTIONS)} "
            f"or EngineConfig {sorted(ENGINE_OPTIONS)}"
        )
    fleet = FleetConfig(**{k: v for k, v in options.items() if k in FLEET_OPTIONS})
    engine = EngineConfig(**{k: v for k, v in options.items() if k in ENGINE_OPTIONS})
    if engine.batch_invariant and fleet.engine != "native":
        raise ValueError(
            f"batch_invariant=True needs engine='native', got engine={fleet.engine!r}: only the native engine "
            "has batch-invariant kernels (rollout.models.invariant)"
        )
    return fleet, engine


def resolve_accelerator(accelerator: str, cluster: Mapping[str, float]) -> str:
    """`auto` -> tpu / gpu / cpu by what the cluster offers; others pass through.

    >>> resolve_accelerator("auto", {"CPU": 8, "TPU": 4})
    'tpu'
    >>> resolve_accelerator("auto", {"CPU": 8})
    'cpu'
    """
    if accelerator != "auto":
        return accelerator
    if cluster.get("TPU", 0) > 0:
        return "tpu"
    if cluster.get("GPU", 0) > 0:
        return "gpu"
    return "cpu"


def worker_resources(cfg: FleetConfig, accelerator: str) -> dict[str, float]:
    """The Ray resources one worker asks for.

    >>> worker_resources(FleetConfig(devices_per_worker=4), "tpu")
    {'CPU': 1.0, 'TPU': 4}
    >>> worker_resources(FleetConfig(devices_per_worker=4), "cpu")
    {'CPU': 1.0}
    """
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if accelerator == "tpu":
        resources["TPU"] = cfg.devices_per_worker
    elif accelerator == "gpu":
        resources["GPU"] = cfg.devices_per_worker
    return resources


def actor_options(cfg: FleetConfig, accelerator: str, driver_env: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for `ActorClass.options(...)` of one worker."""
    res = worker_resources(cfg, accelerator)
    options: dict[str, Any] = {
        "num_cpus": res.pop("CPU"),
        "max_restarts": cfg.max_restarts,
        "max_task_retries": 0,  # the coordinator re-routes failed requests itself (exactly once)
        "runtime_env": {"env_vars": worker_env(cfg, accelerator, driver_env)},
    }
    if "GPU" in res:
        options["num_gpus"] = res.pop("GPU")
    if res:
        options["resources"] = res
    return options


def worker_env(cfg: FleetConfig, accelerator: str, driver_env: Mapping[str, str]) -> dict[str, str]:
    """Environment of a worker process. On CPU: N simulated devices, other XLA flags kept, and
    malloc settings that reuse freed device buffers (rollout.worker.cpu_malloc.CPU_MALLOC; env_vars override them).

    >>> env = worker_env(FleetConfig(devices_per_worker=2), "cpu",
    ...                  {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
    >>> env["XLA_FLAGS"], env["JAX_PLATFORMS"]
    ('--foo --xla_force_host_platform_device_count=2', 'cpu')
    """
    env = {"TOKENIZERS_PARALLELISM": driver_env.get("TOKENIZERS_PARALLELISM", "false")}
    if accelerator == "cpu":
        kept = _DEVICE_COUNT_FLAG.sub("", driver_env.get("XLA_FLAGS", "")).split()
        flags = " ".join([*kept, f"--xla_force_host_platform_device_count={cfg.devices_per_worker}"])
        env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        env.update({k: driver_env.get(k, v) for k, v in CPU_MALLOC.items()})
    for key in _PASSED_THROUGH:  # workers resolve repo ids and cache compiles as the driver does
        if key in driver_env:
            env[key] = driver_env[key]
    env.update(cfg.env_vars)
    return env


def workers_that_fit(per_worker: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many workers of `per_worker` resources fit, filling node by node.

    >>> workers_that_fit({"CPU": 1, "TPU": 4}, [{"CPU": 8, "TPU": 4}, {"CPU": 8, "TPU": 8}])
    3
    """
    total = 0
    for node in nodes:
        fits = [node.get(k, 0.0) // v for k, v in per_worker.items() if v > 0]
        total += int(min(fits)) if fits else 1 << 30
    return total


def check_placement(
    cfg: FleetConfig,
    accelerator: str,
    node_totals: Sequence[Mapping[str, float]],
    cluster: Mapping[str, float],
    available: Mapping[str, float],
) -> None:
    """Raise PlacementError unless the nodes can host `cfg.num_workers` workers at all."""
    per_worker = worker_resources(cfg, accelerator)
    if workers_that_fit(per_worker, node_totals) < cfg.num_workers:
        raise PlacementError(placement_message(cfg, accelerator, cluster, available, node_totals))


def placement_message(
    cfg: FleetConfig,
    accelerator: str,
    cluster: Mapping[str, float],
    available: Mapping[str, float],
    node_totals: Sequence[Mapping[str, float]] = (),
    waited_s: float | None = None,
) -> str:
    per_worker = worker_resources(cfg, accelerator)
    wanted = {k: v * cfg.num_workers for k, v in per_worker.items()}
    show = lambda d: {k: d[k] for k in sorted(d) if k in ("CPU", "GPU", "TPU", "memory") or k in per_worker}  # noqa: E731 - a one-line formatter for the message below
    head = (
        f"rollout workers were not ready after {waited_s:.0f}s"
        if waited_s is not None
        else "the cluster cannot host the rollout workers"
    )
    fit = f"; its nodes can host {workers_that_fit(per_worker, node_totals)} such worker(s)" if node_totals else ""
    hint = (
        " On CPU, devices are simulated: use accelerator='cpu'."
        if accelerator in ("tpu", "gpu")
        else " Lower num_workers or cpus_per_worker, or start Ray with more CPUs."
    )
    return (
        f"{head}: asked for {cfg.num_workers} worker(s) x {per_worker} ({accelerator}, "
        f"{cfg.devices_per_worker} device(s) each) = {wanted}; the cluster has {show(cluster)} in "
        f"total and {show(available)} available{fit}. Check `ray status` for what is missing or "
        f"busy.{hint}"
    )
