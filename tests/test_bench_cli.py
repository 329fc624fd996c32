"""`rollout bench` needs nothing outside the installed package: the benchmarks are modules of
rollout.bench, run in-process, so a copy of the package alone (as a wheel installs it) runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_from_a_copy(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`rollout <argv>` from a copy of the rollout package alone, in a directory without bench/."""
    site = tmp_path / "site"
    if not site.exists():
        shutil.copytree(ROOT / "rollout", site / "rollout", ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        import rollout
        assert rollout.__file__.startswith({str(site)!r}), rollout.__file__
        from rollout.cli import main
        sys.exit(main({argv!r}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_rollout_bench_help_lists_the_benchmarks_without_the_repos_bench_folder(tmp_path):
    proc = run_from_a_copy(tmp_path, ["bench", "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "engine" in proc.stdout and "sync" in proc.stdout


def test_each_benchmarks_help_comes_from_the_installed_package(tmp_path):
    for name, option in (("sync", "--size-gib"), ("engine", "--new-tokens")):
        proc = run_from_a_copy(tmp_path, ["bench", name, "--help"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"rollout bench {name}" in proc.stdout and option in proc.stdout


def test_a_tiny_engine_benchmark_runs_from_the_installed_package(tmp_path, tiny_qwen3):
    proc = run_from_a_copy(tmp_path, ["bench", "engine", "--checkpoint", str(tiny_qwen3), "--batches", "2",
                                      "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1",
                                      "--json", str(tmp_path / "engine.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rollout tok/s" in proc.stdout and " 2/2 " in proc.stdout  # same tokens as transformers
    # the host it ran on, measured in the same run, and each row's roofline fractions
    result = json.loads((tmp_path / "engine.json").read_text())
    assert result["host"]["memory_bandwidth_bytes_s"] > 0 and result["host"]["matmul_peak_flops_s"] > 0
    assert result["rows"][0]["roofline"]["bandwidth_fraction"] > 0
    assert "% bandwidth" in proc.stdout and "% matmul peak" in proc.stdout


def test_a_tiny_agent_benchmark_runs_with_and_without_the_prefix_cache(tmp_path):
    proc = run_from_a_copy(tmp_path, ["bench", "agent", "--tiny", "--json", str(tmp_path / "agent.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "agent.json").read_text())
    assert result["cache"]["generated_tokens"] == result["no_cache"]["generated_tokens"] > 0
    assert 0 < result["cache"]["prefill_tokens"] < result["no_cache"]["prefill_tokens"]
    assert result["cache"]["hit_requests"] > 0 and "fewer prefill tokens" in proc.stdout
