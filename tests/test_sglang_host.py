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
    from rollout.fleet import FleetConfig

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
