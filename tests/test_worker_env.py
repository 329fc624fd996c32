"""worker_env: the environment a worker process starts with."""

from __future__ import annotations

from rollout.coordinator.fleet import worker_env
from rollout.fleet_config import FleetConfig
from rollout.worker.cpu_malloc import CPU_MALLOC


def test_cpu_workers_get_malloc_settings_that_reuse_freed_device_buffers():
    env = worker_env(FleetConfig(devices_per_worker=2), "cpu", {})
    assert {k: env[k] for k in CPU_MALLOC} == CPU_MALLOC
    assert env["MALLOC_ARENA_MAX"] == "1"


def test_malloc_settings_of_the_driver_or_env_vars_win_over_the_defaults():
    from_driver = worker_env(FleetConfig(), "cpu", {"MALLOC_ARENA_MAX": "4"})
    assert from_driver["MALLOC_ARENA_MAX"] == "4"
    from_config = worker_env(FleetConfig(env_vars={"MALLOC_TRIM_THRESHOLD_": "0"}), "cpu", {})
    assert from_config["MALLOC_TRIM_THRESHOLD_"] == "0"


def test_tpu_workers_keep_the_default_malloc():
    env = worker_env(FleetConfig(devices_per_worker=4), "tpu", {})
    assert not set(CPU_MALLOC) & set(env)
