"""The sglang-jax backend seen from a host without it (Python < 3.12, no sglang-jax): clear
refusals that say how to get it. Its real tests (tests/sglang, `-m sglang`) run inside the
Python 3.13 root that `.ci/sglang_root.sh` builds; `.ci/run` runs them there."""

from __future__ import annotations

import sys

import pytest

from rollout.engine import EngineConfig
from rollout.engine.sglang import create_engine, requirements

host_only = pytest.mark.skipif(sys.version_info >= (3, 12), reason="host-side refusals (the root covers >= 3.12)")


@host_only
def test_engine_refuses_python_below_3_12_and_says_how_to_get_it(tiny_qwen3):
    with pytest.raises(requirements.BackendUnavailableError, match=r"needs Python >= 3.12.*sglang_root.sh build"):
        create_engine(tiny_qwen3, EngineConfig(max_batch=1, max_seq_len=64))


@host_only
def test_missing_sglang_jax_is_refused_with_the_install_command():
    with pytest.raises(requirements.BackendUnavailableError, match=r'not installed; install it with `pip install -e "\.\[sglang\]"`'):
        requirements.installed_version()


def test_importing_the_backend_package_imports_neither_jax_nor_sgl_jax():
    import subprocess

    code = "import sys, rollout.engine.sglang; print('jax' in sys.modules, 'sgl_jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_the_backend_is_one_line_of_the_registry_and_a_fleet_option():
    from rollout.engine.backend import BACKENDS
    from rollout.fleet_config import FleetConfig

    assert BACKENDS["sglang-jax"] == "rollout.engine.sglang:create_engine"
    assert FleetConfig(engine="sglang-jax").engine == "sglang-jax"


def test_its_capabilities_refuse_logprobs_and_score_with_its_reasons():
    from rollout.engine.backend import FeatureUnavailableError

    caps = requirements.capabilities("0.0.2", "cpu")
    # the engine's own refusal and the coordinator's are caught alike
    assert issubclass(requirements.LogprobsUnavailableError, FeatureUnavailableError)
    with pytest.raises(FeatureUnavailableError, match=r"return_logprobs=True is not available.*engine='native'"):
        caps.require("logprobs")
    with pytest.raises(FeatureUnavailableError, match=r"score\(\) is not available with engine='sglang-jax'"):
        caps.require("score")


def test_its_capabilities_refuse_top_logprobs_saying_why_and_what_to_use():
    from rollout.engine.backend import FeatureUnavailableError

    caps = requirements.capabilities("0.0.2", "cpu")
    with pytest.raises(FeatureUnavailableError, match=r"top_logprobs is not available with engine='sglang-jax'.*"
                                                       r"top_logprobs_num.*engine='native'"):
        caps.require("top_logprobs")


def test_its_capabilities_refuse_structured_output_saying_to_use_the_native_engine():
    from rollout.engine.backend import FeatureUnavailableError

    caps = requirements.capabilities("0.0.2", "cpu")
    with pytest.raises(FeatureUnavailableError, match=r"structured output .*engine='sglang-jax'.*engine='native'"):
        caps.require("structured_output")


def test_a_backend_that_declares_no_capabilities_can_do_everything():
    from rollout.engine.backend import FULL_CAPABILITIES, capabilities_of

    assert capabilities_of(object()) is FULL_CAPABILITIES
    FULL_CAPABILITIES.require("logprobs")
    FULL_CAPABILITIES.require("score")


def test_rollout_bench_backends_help_comes_from_the_package():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "rollout.cli", "bench", "backends", "--help"],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rollout bench backends" in proc.stdout and "--side" in proc.stdout


# -- the demo's engine option ------------------------------------------------------------------


def _demo_options(*argv: str):
    from rollout.cli import build_parser
    from trainer_stub.train import options_from_args

    return options_from_args(build_parser().parse_args(["demo", *argv]))


def test_demo_engine_option_reaches_the_fleet_and_sizes_the_built_in_model_for_the_backend():
    from trainer_stub.train import head_dim_for

    _, fleet, _ = _demo_options("--engine", "sglang-jax")
    assert fleet.engine == "sglang-jax" and fleet.service_options()["engine"] == "sglang-jax"
    assert fleet.devices_per_worker == 1  # the backend's DEMO_DEVICES_PER_WORKER
    assert head_dim_for("sglang-jax") == 128
    _, fleet, _ = _demo_options("--engine", "sglang-jax", "--devices-per-worker", "2")
    assert fleet.devices_per_worker == 2


def test_the_default_demo_is_unchanged_native_on_two_devices_with_the_head_dim_32_model():
    from trainer_stub.clients import FleetOptions
    from trainer_stub.train import head_dim_for

    _, fleet, _ = _demo_options()
    assert fleet == FleetOptions() and fleet.engine == "native" and fleet.devices_per_worker == 2
    assert head_dim_for("native") == 32


@host_only
@pytest.mark.parametrize("command", [["rollout.cli", "demo"], ["trainer_stub.train"]])
def test_demo_on_sglang_jax_is_refused_before_anything_starts_where_it_cannot_run(command, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", *command, "--engine", "sglang-jax", "--out-dir", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --engine sglang-jax cannot run here: engine='sglang-jax' needs Python >= 3.12")
    assert "Traceback" not in proc.stderr and "sglang_root.sh build" in proc.stderr
    assert not any(tmp_path.iterdir())  # no checkpoint made, no log written


def test_demo_help_offers_the_engine_backends():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "rollout.cli", "demo", "--help"], check=False, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "--engine {native,sglang-jax}" in proc.stdout
