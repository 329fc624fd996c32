"""`rollout demo --engine sglang-jax`: the RL demo on sglang-jax workers (a short run). It learns on
the head_dim-128 built-in model, checks that every sample carries the version synced last, and
says plainly that the on-policy logprob check is unavailable (the backend declares it cannot
return logprobs on CPU), in its output, its summary and its JSON-lines log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.ray]

STEPS = 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/ray")}
    proc = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "demo", "--engine", "sglang-jax", "--workers", "1", "--steps", str(STEPS),
         "--group-size", "2", "--max-batch", "16", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=900, check=False, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return proc, lines, out


def test_demo_runs_every_step_on_the_version_synced_last(demo_run):
    _, lines, _ = demo_run
    steps = [line for line in lines if line["event"] == "step"]
    assert [s["step"] for s in steps] == list(range(STEPS))
    assert [s["weight_version"] for s in steps] == [1, 2, 3]  # version 1 is the initial sync
    assert [s["new_version"] for s in steps] == [2, 3, 4]
    assert all(s["version_ok"] for s in steps)
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["versions_ok"] and summary["engine"] == "sglang-jax"


def test_demo_says_the_logprob_check_is_unavailable_and_why(demo_run):
    proc, lines, _ = demo_run
    first, summary = lines[0], lines[-1]
    assert first == {"event": "logprob_check", "engine": "sglang-jax", "available": False, "reason": first["reason"]}
    assert "return_logprobs=True is not available with engine='sglang-jax'" in first["reason"]
    assert summary["logprob_check"] == "unavailable" and summary["logprob_check_unavailable_reason"] == first["reason"]
    assert summary["max_logprob_diff_on_policy"] is None
    assert all(line["logprob_diff"] is None for line in lines if line["event"] == "step")
    assert "on-policy logprob check: UNAVAILABLE on engine 'sglang-jax'" in proc.stdout
    assert "max logprob diff (on-policy)    UNAVAILABLE" in proc.stdout


def test_demo_serves_a_head_dim_128_built_in_model(demo_run):
    proc, _, out = demo_run
    config = json.loads((out / "tiny-qwen3-hd128" / "config.json").read_text())
    assert config["head_dim"] == 128 and config["hidden_size"] == 64
    assert "1 worker(s) x 1 device(s), engine sglang-jax" in proc.stdout
