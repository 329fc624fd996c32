"""The `rollout` command line: `rollout demo` end to end (progress, table, plot, JSON log), and
`generate`, `bench` and `--help` of every subcommand.

The demo's learning and logprob checks are pinned by tests/test_trainer.py on the same loop;
here a few steps show that the command runs and writes what it promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEP_KEYS = {"step", "mean_reward", "weight_version", "sync_ms", "logprob_diff", "tokens_per_s", "version_ok"}


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.run(
        [sys.executable, "-m", "rollout.cli", *args], check=False, capture_output=True, text=True, timeout=timeout, env=env
    )


def fleet_available() -> bool:
    import rollout

    return hasattr(rollout, "init")


def check_demo_outputs(proc: subprocess.CompletedProcess, out_dir: Path, steps: int) -> list[dict]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plot = out_dir / "reward.png"
    assert f"plot: {plot}" in proc.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean reward, last 5 steps" in proc.stdout  # the summary table
    assert "RL steps" in proc.stderr  # the tqdm bar
    lines = [json.loads(line) for line in (out_dir / "steps.jsonl").read_text().splitlines()]
    records = [line for line in lines if line["event"] == "step"]
    assert [r["step"] for r in records] == list(range(steps))
    assert all(STEP_KEYS <= set(r) for r in records)
    assert lines[-1]["event"] == "summary" and lines[-1]["versions_ok"]
    return records


def test_demo_on_a_local_engine_writes_plot_log_and_table(tmp_path):
    proc = run_cli("demo", "--backend", "local", "--steps", "3", "--group-size", "4", "--out-dir", str(tmp_path))
    records = check_demo_outputs(proc, tmp_path, steps=3)
    assert all(r["logprob_diff"] <= 1e-4 for r in records)


@pytest.mark.ray
@pytest.mark.skipif(not fleet_available(), reason="the Ray fleet (rollout.init) is not in this checkout yet")
def test_demo_on_the_ray_fleet_checks_logprobs_and_catches_a_skipped_sync(tmp_path):
    proc = run_cli(
        "demo", "--steps", "4", "--workers", "2", "--devices-per-worker", "2", "--group-size", "4",
        "--skip-sync-at", "1", "--out-dir", str(tmp_path),
    )
    records = check_demo_outputs(proc, tmp_path, steps=4)
    assert [r["new_version"] for r in records] == [2, 2, 3, 4]  # version 1 is the initial sync
    assert [r["weight_version"] for r in records] == [1, 2, 2, 3]
    diffs = [r["logprob_diff"] for r in records]
    assert diffs[2] > 1e-2, diffs  # sampled by version 2, scored with params updated twice since
    assert max(diffs[0], diffs[1], diffs[3]) <= 1e-4, diffs


def test_generate_prints_one_json_line_per_sample(tiny_qwen3):
    proc = run_cli("generate", str(tiny_qwen3), "Hello", "你是谁", "--chat", "--n", "2", "--max-tokens", "5",
                   "--temperature", "1", "--seed", "0", "--logprobs")
    assert proc.returncode == 0, proc.stderr
    outs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(o["prompt_index"], o["sample_index"]) for o in outs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(1 <= len(o["token_ids"]) == len(o["logprobs"]) <= 5 for o in outs)


def test_generate_takes_prompts_after_the_options_too(tiny_qwen3):
    proc = run_cli("generate", str(tiny_qwen3), "--max-tokens", "2", "Hello", "--chat", "你是谁")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["prompt_index"] for line in proc.stdout.splitlines()] == [0, 1]


def test_generate_refuses_an_unknown_option(tiny_qwen3):
    proc = run_cli("generate", str(tiny_qwen3), "Hello", "--bogus", timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


@pytest.mark.parametrize("command", [[], ["demo"], ["generate"], ["bench"]])
def test_every_command_has_help(command):
    proc = run_cli(*command, "--help", timeout=60)
    assert proc.returncode == 0 and "usage: rollout" in proc.stdout


def test_bench_names_the_available_benchmarks_for_an_unknown_one():
    proc = run_cli("bench", "nonexistent", timeout=60)
    assert proc.returncode != 0 and "choose from" in proc.stderr and "engine" in proc.stderr and "sync" in proc.stderr
