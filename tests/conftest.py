"""Shared fixtures: simulated devices, tiny HF checkpoints made on the spot, a local Ray.

XLA_FLAGS must be set before jax is first imported, so it is set here at import time.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads this when it is imported: "0" makes it take 127.0.0.1 as every node's address (not the
# machine's routable one), for every Ray the tests start and every process those start.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pathlib import Path

import pytest

from rollout.testing import make_tiny_checkpoint  # imports no jax: the cache below is set before jax starts


def _session_compilation_cache() -> None:
    """One persistent JAX compilation cache for the session (removed at exit), every compile
    kept: most of the suite's time is XLA compiling, and many engines and fleets (and their Ray
    workers, which the fleet passes these variables to) compile identical programs. A compile
    served from the cache still emits JAX's backend-compile event, so the tests that count
    compiles (a swap compiles nothing) see every one. A cache dir set by the caller is kept."""
    import atexit
    import shutil
    import tempfile

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache = tempfile.mkdtemp(prefix="rollout-tests-jax-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


_session_compilation_cache()


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_qwen3(ckpt_root: Path) -> Path:
    """The default tiny Qwen3: tied embeddings, GQA 4:2, head_dim 32 != hidden/heads."""
    return make_tiny_checkpoint(ckpt_root / "qwen3", "Qwen3ForCausalLM", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen3_perturbed(ckpt_root: Path) -> Path:
    """Same shapes as tiny_qwen3, different weights (another seed)."""
    return make_tiny_checkpoint(ckpt_root / "qwen3_b", "Qwen3ForCausalLM", seed=2)


@pytest.fixture(scope="session")
def tiny_moe(ckpt_root: Path) -> Path:
    """The tiny Qwen3-MoE that transformers wrote (tests/moe_reference.py's TINY_MOE, seed 5): the
    model of the MoE fleets (tests/test_moe_fleet.py, tests/reliability/test_moe_bad_updates.py)."""
    from moe_reference import make_moe_checkpoint

    return make_moe_checkpoint(ckpt_root / "qwen3_moe", seed=5)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (started on first use, shut down at the end)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=2 * 1024**3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# -- the demo's built-in tiny Qwen3, its task and one in-process engine (trainer_stub tests) ------


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer_stub import train

    return train.builtin_checkpoint(tmp_path_factory.mktemp("demo") / "tiny-qwen3")


@pytest.fixture(scope="session")
def demo_task(demo_model: Path):
    from rollout.tokenizer import Tokenizer
    from trainer_stub.tasks import DigitsTask

    return DigitsTask.for_tokenizer(Tokenizer.from_pretrained(demo_model))


@pytest.fixture(scope="module")
def demo_client(demo_model: Path):
    """The demo's LocalEngineClient (one engine over 2 devices), shared by a module's tests."""
    from trainer_stub import clients

    c = clients.LocalEngineClient(demo_model, clients.FleetOptions(devices_per_worker=2))
    yield c
    c.shutdown()
