"""The engine benchmark's accelerator path, proven on the CPU where it can be: `python -m
rollout.bench engine` in bfloat16 end to end without Ray (the device machine has none), the
accelerator-sized shapes' parameter counts, the bfloat16 roofline bytes, the bfloat16
checkpoint the benchmark draws, and the prompts of a batch of 256. What needs a GPU (JAX on
CUDA, torch on "cuda", the device probes) runs only in rollout/bench/accelerator.sh."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes  # noqa: F401 - numpy reads the checkpoint's bfloat16 tensors through it
import numpy as np
import pytest

from rollout.bench import checkpoints, devices, engine, host, roofline
from rollout.bench.engine import distinct_prompts
from rollout.bench.host import CpuInfo, MatmulRate
from rollout.bench.roofline import DecodeCost, HostLimits
from rollout.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# Run `python -m rollout.bench ...` (argv after the code) with `import ray` failing as it does
# where Ray is not installed; every attempt to import it is printed on the last line.
WITHOUT_RAY = textwrap.dedent(
    """
    import atexit, importlib.abc, json, runpy, sys

    attempts = []

    class NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoRay())
    atexit.register(lambda: print("RAY_IMPORTS=" + json.dumps(attempts), flush=True))
    sys.argv = ["rollout.bench", *sys.argv[1:]]
    runpy.run_module("rollout.bench", run_name="__main__", alter_sys=True)
    """
)


def run_python(code: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("XLA_FLAGS", None)  # the benchmark uses one device
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """The tiny shape through `python -m rollout.bench engine --dtype bfloat16`, without Ray."""
    tmp = tmp_path_factory.mktemp("bench-bf16")
    proc = run_python(WITHOUT_RAY, "engine", "--shape", "tiny", "--dtype", "bfloat16", "--batches", "3",
                      "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1", "--no-host", "--workdir", str(tmp / "work"),
                      "--json", str(tmp / "engine.json"), cwd=tmp)
    return proc, tmp


def test_the_engine_benchmark_runs_as_a_module_in_bfloat16_without_ray(bf16_run):
    proc, tmp = bf16_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    # nothing the benchmark imports (rollout.bench.engine, what its main imports, and what
    # they import while running) even tried to import Ray
    assert proc.stdout.strip().splitlines()[-1] == "RAY_IMPORTS=[]"
    assert "params, bfloat16, CPU (" in proc.stdout and "rollout tok/s" in proc.stdout
    result = json.loads((tmp / "engine.json").read_text())
    assert result["run"]["dtype"] == "bfloat16" and result["run"]["platform"] == "cpu"
    assert set(result["run"]["seconds"]) == {"checkpoint", "rollout_load", "transformers_load"}
    assert result["run"]["complete"] is True
    rows = result["rows"]
    assert [r["batch"] for r in rows] == [3]
    # both sides load the bfloat16 weights: the tiny model's greedy tokens agree
    assert [r["identical_outputs"] for r in rows] == ["3/3"]
    # the first call (compilation) is timed apart from the best of the timed runs
    assert all(r["rollout_first_call_s"] > 0 and r["transformers_first_call_s"] > 0 for r in rows)
    assert "first call (compiles)" in proc.stderr


def test_the_roofline_of_a_bfloat16_run_counts_two_bytes_per_parameter_and_probes_in_bfloat16(monkeypatch):
    probed = []

    def measure_host(shapes, dtype, platform):
        probed.append((list(shapes), dtype, platform))
        return HostLimits(CpuInfo("cpu", 2, ()), 20e9, (MatmulRate("jax", *shapes[0], 1e11),), dtype)

    monkeypatch.setattr(roofline, "measure_host", measure_host)
    cfg = checkpoints.shape_config("tiny")
    params = checkpoints.param_count("tiny")
    args = SimpleNamespace(batches=[1, 3], prompt_len=8, new_tokens=4, dtype="bfloat16", platform="cpu")
    rows = [dict(batch=3, rollout_tok_s=100.0, ratio=1.0)]
    host_json, lines = roofline.roofline_table(ModelConfig.from_hf(cfg), params, args, rows,
                                               [("rollout", "rollout_tok_s", "ratio")])
    assert probed == [([(3, 64, 128)], "bfloat16", "cpu")]
    cost = DecodeCost(params, cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                      cfg["head_dim"], dtype_bytes=2)
    assert rows[0]["roofline"]["bytes_per_token"] == pytest.approx(cost.run_per_token(3, 8, 4)[0])
    assert host_json["dtype"] == "bfloat16" and "(jitted bfloat16 sum" in lines[1]


def test_the_host_probes_run_in_bfloat16():
    assert host.memory_bandwidth(nbytes=1 << 20, repeats=1, dtype="bfloat16", calls=3) > 0  # back to back, as on a GPU
    rates = host.matmul_peak([(2, 8, 16)], repeats=1, target_seconds=0.001, dtype="bfloat16")
    assert rates and all(r.flops_per_s > 0 for r in rates)


def test_the_bfloat16_checkpoint_is_written_in_bfloat16_and_reused(bf16_run):
    _, tmp = bf16_run
    ckpt = tmp / "work" / "tiny-bfloat16"
    assert json.loads((ckpt / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    names = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(ckpt / "model-00001-of-00001.safetensors"), "numpy") as f:
        assert sorted(f.keys()) == sorted(names)
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}  # noqa: SIM118 - not a dict
        norm = f.get_tensor("model.norm.weight").astype(np.float32)
    assert 0.5 < norm.mean() < 1.5  # norms are drawn around 1
    stamp = (ckpt / "model-00001-of-00001.safetensors").stat().st_mtime_ns
    checkpoints.make_checkpoint(ckpt, "tiny", "bfloat16")  # complete: reused, not rewritten
    assert (ckpt / "model-00001-of-00001.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("module", [checkpoints, devices, engine])
def test_docstring_examples_hold(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_the_accelerator_shapes_have_the_real_models_parameter_counts():
    assert checkpoints.param_count("qwen3-0.6b") == pytest.approx(0.596e9, rel=1e-3)  # tied: embedding once
    assert checkpoints.param_count("qwen3-8b") == pytest.approx(8.19e9, rel=1e-3)  # untied head
    cfg = checkpoints.shape_config("qwen3-8b")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (4096, 36, 32, 8, 128, 12288, 151936)
    assert cfg["tie_word_embeddings"] is False and cfg["rope_theta"] == 1e6


def test_bfloat16_halves_the_bytes_a_token_reads():
    f32 = DecodeCost(1_000_000, num_layers=4, num_heads=16, num_kv_heads=8, head_dim=128)
    bf16 = DecodeCost(1_000_000, num_layers=4, num_heads=16, num_kv_heads=8, head_dim=128,
                      dtype_bytes=roofline.dtype_bytes("bfloat16"))
    assert bf16.bytes_per_token(16, 63.5) == f32.bytes_per_token(16, 63.5) / 2
    assert bf16.flops_per_token(63.5) == f32.flops_per_token(63.5)


def test_an_accelerators_limits_name_the_device_and_the_dtype():
    limits = HostLimits(CpuInfo("cpu", 16, ()), 3.0e12, (MatmulRate("jax", 256, 4096, 12288, 5e14),),
                        "bfloat16", "NVIDIA H100 80GB HBM3 x1 (torch: NVIDIA H100 80GB HBM3)")
    lines = limits.describe()
    assert lines[1] == "device: NVIDIA H100 80GB HBM3 x1 (torch: NVIDIA H100 80GB HBM3)"
    assert lines[2].startswith("device memory bandwidth 3000.0 GB/s (jitted bfloat16 sum")
    assert limits.to_json()["device"].startswith("NVIDIA H100")


def test_a_batch_of_256_gets_distinct_prompts_drawn_as_before():
    prompts = distinct_prompts(256, 32)
    assert len({tuple(p) for p in prompts}) == 256
    assert prompts == np.random.default_rng(0).integers(0, 400, (256, 32)).tolist()  # the figures' prompts
    assert len({tuple(p) for p in distinct_prompts(300, 1)}) == 300  # repeats drawn again
    with pytest.raises(ValueError, match="do not exist"):
        distinct_prompts(401, 1)


def test_the_gpu_platform_puts_jax_on_cuda_without_preallocation_and_torch_on_cuda(monkeypatch):
    for name in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(name, raising=False)
    platform = devices.use_platform("gpu")
    assert (platform.torch_device, platform.default_dtype) == ("cuda", "bfloat16")
    assert os.environ["JAX_PLATFORMS"] == "cuda" and os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    devices.use_platform("gpu")
    assert os.environ["JAX_PLATFORMS"] == "cpu"  # a variable already set is left as it is


def test_importing_the_benchmark_leaves_jax_unstarted_so_that_platform_takes_effect(tmp_path):
    code = "import json, sys, rollout.bench.__main__, rollout.bench.engine; print(json.dumps('jax' in sys.modules))"
    proc = run_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "false"


def test_an_unknown_platform_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="expected one of"):
        devices.use_platform("npu")


def test_the_accelerator_name_is_jaxs_device_kind_and_count():
    import jax

    assert devices.accelerator_name("cpu") == f"{jax.devices()[0].device_kind} x{len(jax.devices())}"


def test_the_accelerator_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "rollout" / "bench" / "accelerator.sh")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
