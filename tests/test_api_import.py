"""The public API: `import rollout` is light (no jax, no torch, no Ray) and exposes the names the
design promises; the service module loads lazily and stays jax-free on the driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("jax", "jaxlib", "flax", "torch", "transformers")


def run_fresh(code: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_rollout_imports_neither_jax_nor_torch_nor_ray():
    result = run_fresh(
        """
        import json, sys
        import rollout
        print(json.dumps(sorted(m for m in ("jax", "jaxlib", "flax", "torch", "transformers", "ray") if m in sys.modules)))
        """
    )
    assert result == []


def test_the_service_modules_keep_the_driver_free_of_jax_and_torch():
    result = run_fresh(
        f"""
        import json, sys
        import rollout
        rollout.RolloutService, rollout.GenerationStream
        import rollout.coordinator.service, rollout.coordinator.sync, rollout.coordinator.dispatch, rollout.worker.actor, rollout.weights.buckets
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
        """
    )
    assert result == []


def test_public_names_are_exported():
    import rollout

    for name in ("init", "sync_weights", "generate", "generate_async", "status", "shutdown", "RolloutService",
                 "SamplingParams", "Completion", "EngineConfig", "FleetConfig", "SyncError", "SpecMismatchError", "NonFiniteWeightsError",
                 "PlacementError", "GenerationStream"):
        assert hasattr(rollout, name), name
    assert set(rollout.__all__) <= set(dir(rollout)) | {"RolloutService", "GenerationStream"}


def test_module_functions_without_init_say_to_call_init():
    import rollout

    with pytest.raises(rollout.ServiceClosedError, match=r"rollout.init"):
        rollout.generate([[1, 2, 3]])
    rollout.shutdown()  # a no-op without a service


def test_init_takes_every_service_option_with_the_same_defaults():
    import inspect

    import rollout
    from rollout.coordinator.service import RolloutService

    init = inspect.signature(rollout.init).parameters
    service = inspect.signature(RolloutService.__init__).parameters
    explicit = [name for name in init if init[name].default is not inspect.Parameter.empty]
    assert explicit and {n: init[n].default for n in explicit} == {n: service[n].default for n in explicit}
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in init.values())  # the rest go through as-is


def test_the_readme_documents_every_service_option():
    import dataclasses
    from pathlib import Path

    from rollout.engine.config import EngineConfig
    from rollout.fleet_config import FleetConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    fields = {f.name for cls in (FleetConfig, EngineConfig) for f in dataclasses.fields(cls)}
    assert sorted(name for name in fields if f"`{name}`" not in readme) == []


def test_the_removed_pipelined_sync_option_says_so_before_anything_starts():
    from rollout.coordinator.service import RolloutService

    with pytest.raises(TypeError, match="option 'pipelined_sync' was removed: every sync is pipelined"):
        RolloutService("/nonexistent/checkpoint", pipelined_sync=False)


def test_an_unregistered_engine_is_refused_with_the_registered_ones():
    import rollout

    with pytest.raises(
        ValueError, match=r"engine='vllm': expected a registered backend, one of \['native', 'sglang-jax'\]"
    ):
        rollout.FleetConfig(engine="vllm")


def test_a_worker_class_that_is_not_a_rollout_worker_is_refused_before_anything_starts():
    from rollout.coordinator.service import RolloutService

    with pytest.raises(TypeError, match=r"worker_class=<class 'object'>: expected rollout\.worker\.actor\.RolloutWorker"):
        RolloutService("/nonexistent/checkpoint", worker_class=object)
