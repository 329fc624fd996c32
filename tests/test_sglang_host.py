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
