"""Each sglang-jax 0.0.2 workaround, shown necessary: the engine does not start without it.

Every case starts an engine in a fresh process (the flags are process-wide flax configuration,
the sampler wrapper patches a module) with one workaround left out, and looks for the defect's
symptom; test_engine.py's engine, with all of them, starts and serves.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rollout.engine.sglang import workarounds

pytestmark = [pytest.mark.sglang, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

START = """
import sys
from rollout.engine import EngineConfig
from rollout.engine.sglang import create_engine
engine = create_engine(sys.argv[1], EngineConfig(max_batch=1, max_seq_len=64, load_format="dummy"),
                       _skip_workarounds=tuple(sys.argv[2:]))
print("ENGINE STARTED", engine.status()["workarounds"], flush=True)
"""


def _start_without(checkpoint, name: str) -> subprocess.CompletedProcess:
    # Without the flags an engine of this process may have set (workarounds set them in
    # os.environ too, for flax imported later): the child must start from flax's defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAX_")}
    return subprocess.run(
        [sys.executable, "-c", START, str(checkpoint), name],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )


@pytest.mark.parametrize(
    "name, symptom",
    [
        ("shard_variables_off", "auto mesh context or metadata is required"),
        ("pytree_modules_off", "Duplicate custom PyTreeDef type registration"),
        ("min_p_operands", "too many values to unpack (expected 2)"),
    ],
)
def test_engine_does_not_start_without_the_workaround(ckpt_a, name, symptom):
    run = _start_without(ckpt_a, name)
    output = run.stdout + run.stderr
    assert "ENGINE STARTED" not in output
    assert symptom in output, output[-3000:]


def test_every_workaround_is_gated_on_its_version():
    assert [w.name for w in workarounds.for_version("0.0.2")] == [
        "shard_variables_off",
        "pytree_modules_off",
        "min_p_operands",
    ]
    assert workarounds.for_version("0.0.3") == ()
