"""Engine backends against each other and transformers: native, sglang-jax and transformers'
`generate`, in one run, on the same Qwen3-shaped checkpoint (head_dim 128, which sglang-jax
needs) and the same prompts, greedy, EOS ignored.

    sudo rollout bench backends                        # batch 1 and 16, 128 new tokens
    rollout bench backends --tiny --batches 1 2 --new-tokens 8 --repeats 1   # proves it runs

This process runs native and transformers alternately (transformers and torch: the `bench`
extra). The sglang-jax side runs right after in a child process, on the same checkpoint and
prompts, and reports its tokens and timings as JSON: with this Python if it can run sglang-jax
(>= 3.12 with the `sglang` extra), else in the Python 3.13 root of the checkout's
`.ci/sglang_root.sh` (as root; the checkpoint's directory is bound into it). Each side is
warmed up once per batch size (compilation is not timed) and the best of --repeats runs is
kept. `--side NAME` runs one side alone (how the sglang-jax side is run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollout.worker.cpu_malloc import keep_freed_memory

# the checkout this package was installed from (editable), whose .ci/ has the root script
ROOT_SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "sglang_root.sh"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rollout bench backends", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes to measure")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per prompt")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size and side (best is kept)")
    p.add_argument("--tiny", action="store_true", help="the tiny test shapes (head_dim 128) instead of ~90M params")
    p.add_argument("--side", choices=["native", "sglang-jax", "transformers"], default=None,
                   help="run one side only, on --checkpoint, and write --out")
    p.add_argument("--checkpoint", type=Path, default=None, help="reuse this HF directory instead of making one")
    p.add_argument("--out", type=Path, default=None, help="--side: write its results here as JSON")
    p.add_argument("--json", type=Path, default=None, help="also write the table here as JSON")
    return p.parse_args(argv)


def make_checkpoint(directory: Path, tiny: bool) -> Path:
    from rollout.testing import BENCH_QWEN3, make_tiny_checkpoint

    shape = dict(head_dim=128) if tiny else {**BENCH_QWEN3, "head_dim": 128}
    return make_tiny_checkpoint(directory, "Qwen3ForCausalLM", seed=0, **shape)


def prompts_for(args: argparse.Namespace) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(0).integers(0, 400, (max(args.batches), args.prompt_len)).tolist()


def side_runner(name: str, ckpt: Path, args: argparse.Namespace) -> tuple[Callable[[list], list], Callable[[], None]]:
    """(run(prompts) -> token lists, close) for one side."""
    max_seq = args.prompt_len + args.new_tokens
    if name == "transformers":
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

        def run_hf(prompts: list) -> list:
            ids = torch.tensor(prompts)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     eos_token_id=None, pad_token_id=0)
            return out[:, args.prompt_len:].tolist()

        return run_hf, lambda: None
    import jax

    from rollout.engine import EngineConfig, SamplingParams
    from rollout.engine.backend import engine_factory, generating_engine

    config = EngineConfig(max_batch=max(args.batches), max_seq_len=max_seq)
    engine = generating_engine(engine_factory(name)(str(ckpt), config, jax.devices()[:1]))
    sampling = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def run_engine(prompts: list) -> list:
        return [list(c.token_ids) for c in engine.generate(prompts, sampling, return_logprobs=False)]

    return run_engine, engine.shutdown


def measure(runs: dict[str, Callable[[list], list]], prompts: list, args: argparse.Namespace) -> dict[str, Any]:
    """{side: {batch: {"tok_s", "tokens"}}}, sides alternating within each batch size."""
    from tqdm.auto import tqdm

    out: dict[str, Any] = {name: {} for name in runs}
    for batch in tqdm(args.batches, desc="batch sizes", unit="batch"):
        tokens = {name: run(prompts[:batch]) for name, run in runs.items()}  # warm-up
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                time.sleep(0.3)  # let the other side's spinning threads go idle
                start = time.perf_counter()
                run(prompts[:batch])
                best[name] = min(best[name], time.perf_counter() - start)
        for name in runs:
            out[name][str(batch)] = {"tok_s": batch * args.new_tokens / best[name], "tokens": tokens[name]}
    return out


def run_sglang_side(ckpt_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The sglang-jax side in a child process: this Python if it can, else the Python 3.13 root
    (the checkpoint's directory bound at /refs there)."""
    side = ["--side", "sglang-jax", "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
            "--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
    from rollout.engine.sglang.requirements import runs_here

    if runs_here():
        cmd = [sys.executable, "-m", "rollout.bench.backends", *side,
               "--checkpoint", str(ckpt_dir / "ckpt"), "--out", str(ckpt_dir / "sglang.json")]
        env = dict(os.environ)
    elif ROOT_SCRIPT.exists():
        cmd = [str(ROOT_SCRIPT), "run", "python", "-m", "rollout.bench.backends", *side,
               "--checkpoint", "/refs/ckpt", "--out", "/refs/sglang.json"]
        env = dict(os.environ, ROLLOUT_SGLANG_REFS=str(ckpt_dir))
    else:
        raise SystemExit(
            f"the sglang-jax side needs Python >= 3.12 with the sglang extra here, or the checkout's "
            f"{ROOT_SCRIPT.relative_to(ROOT_SCRIPT.parents[1])} (not found at {ROOT_SCRIPT}): run this "
            "benchmark from an editable install of the rollout checkout"
        )
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((ckpt_dir / "sglang.json").read_text())["sglang-jax"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # as the fleet's CPU workers run: see rollout.worker.cpu_malloc (before jax starts)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.side:
        prompts = prompts_for(args)
        run, close = side_runner(args.side, args.checkpoint, args)
        try:
            result = measure({args.side: run}, prompts, args)
        finally:
            close()
        args.out.write_text(json.dumps(result))
        return 0

    work = Path(tempfile.mkdtemp(prefix="rollout-bench-backends-"))
    ckpt = args.checkpoint or make_checkpoint(work / "ckpt", args.tiny)
    if args.checkpoint:
        os.symlink(ckpt.resolve(), work / "ckpt")
    prompts = prompts_for(args)
    runs, closers = {}, []
    for name in ("native", "transformers"):
        runs[name], close = side_runner(name, ckpt, args)
        closers.append(close)
    try:
        results = measure(runs, prompts, args)
    finally:
        for close in closers:
            close()
    results["sglang-jax"] = run_sglang_side(work, args)

    from rollout.models.config import ModelConfig

    config = ModelConfig.from_pretrained(ckpt)
    print(f"\nmodel: Qwen3-shaped, hidden {config.hidden_size}, {config.num_layers} layers, head_dim "
          f"{config.head_dim}, float32, CPU ({os.cpu_count()} cores), prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy; engines on 1 device; best of {args.repeats}")
    print(f"{'batch':>5} {'native tok/s':>13} {'sglang-jax tok/s':>17} {'transformers tok/s':>19} "
          f"{'native=hf':>10} {'sglang=hf':>10}")
    rows = []
    for batch in map(str, args.batches):
        ref = results["transformers"][batch]["tokens"]
        same = {k: sum(a == b for a, b in zip(results[k][batch]["tokens"], ref)) for k in ("native", "sglang-jax")}
        row = dict(batch=int(batch), **{f"{k}_tok_s": results[k][batch]["tok_s"] for k in results},
                   native_identical=f"{same['native']}/{batch}", sglang_identical=f"{same['sglang-jax']}/{batch}")
        rows.append(row)
        print(f"{batch:>5} {row['native_tok_s']:>13.1f} {row['sglang-jax_tok_s']:>17.1f} "
              f"{row['transformers_tok_s']:>19.1f} {row['native_identical']:>10} {row['sglang_identical']:>10}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
