"""float32, bfloat16 and int8 engines on one checkpoint, in one run: tokens/s, weights, logprobs.

`rollout bench engine --quantization int8` runs this instead of the transformers comparison:
the three engines of the same checkpoint (--shape) decode the same prompts greedily (EOS
ignored) at each batch size, alternating engine by engine so that slow phases of a shared host
hit all three; the best of --repeats runs is kept. It prints tokens/s and the int8 engine's
ratio to each, the serving weights' bytes of each (rollout.engine.quantized.weight_bytes: the
quantized kernels' values and scales, and the derived head copy), and the int8 engine's
per-token logprob difference against the float32 engine, both scoring the float32 engine's
greedy completions (teacher-forced, so the sequences are the same), and the time a sync's
stage takes on each (the same full-precision update: validated, placed and, for int8,
quantized on the worker). Quantizing on the coordinator to ship int8 bytes is not implemented.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENGINES = (("float32", "float32", None), ("bfloat16", "bfloat16", None), ("int8", "float32", "int8"))


def run(args: argparse.Namespace, shape: dict[str, Any], steal: Callable[[], Callable[[], float | None]]) -> int:
    """`shape`: the --shape's checkpoint overrides; `steal()` starts a CPU-steal reading and
    returns the function that ends it (rollout.bench.engine's, which calls this)."""
    import jax
    import numpy as np

    from rollout.engine import EngineConfig, SamplingParams
    from rollout.engine.native.engine import Engine
    from rollout.engine.quantized import weight_bytes
    from rollout.testing import make_bench_checkpoint

    root = Path(tempfile.mkdtemp(prefix="rollout-bench-q-"))
    ckpt = args.checkpoint or make_bench_checkpoint(root / args.shape, **shape)
    max_batch = max(args.batches)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 400, (max_batch, args.prompt_len)).tolist()
    sampling = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    engines: dict[str, Any] = {}
    for name, dtype, quantization in ENGINES:
        if name == "int8":
            quantization = args.quantization
            name = args.quantization
        config = EngineConfig(max_batch=max_batch, max_seq_len=args.prompt_len + args.new_tokens,
                              decode_steps=args.decode_steps, dtype=dtype, quantization=quantization)
        engines[name] = Engine(ckpt, config, devices=jax.devices()[:1])
    qname = args.quantization

    def generate(engine: Any, batch: int) -> list[list[int]]:
        return [list(c.token_ids) for c in engine.generate(prompts[:batch], sampling)]

    rows = []
    for batch in args.batches:
        outputs = {name: generate(e, batch) for name, e in engines.items()}  # warm-up: compiles
        times: dict[str, list[float]] = {name: [] for name in engines}
        steal_reading = steal()
        for _ in range(args.repeats):
            for name, engine in engines.items():
                time.sleep(0.3)
                start = time.perf_counter()
                generate(engine, batch)
                times[name].append(time.perf_counter() - start)
        n = batch * args.new_tokens
        row: dict[str, Any] = {"batch": batch, "cpu_steal_percent": steal_reading()}
        for name in engines:
            row[f"{name}_tok_s"] = n / min(times[name])
        row["same_tokens_as_float32"] = sum(a == b for a, b in zip(outputs[qname], outputs["float32"]))
        rows.append(row)

    # logprob mismatch: both engines score the float32 engine's greedy completions
    k = min(8, max_batch)
    completions = generate(engines["float32"], k)
    lp = {name: engines[name].score(prompts[:k], completions).logprobs for name in ("float32", "bfloat16", qname)}
    ref = np.concatenate([np.asarray(x) for x in lp["float32"]])
    mismatch = {
        name: {"mean_abs": float(np.mean(np.abs(np.concatenate([np.asarray(x) for x in lp[name]]) - ref))),
               "max_abs": float(np.max(np.abs(np.concatenate([np.asarray(x) for x in lp[name]]) - ref)))}
        for name in ("bfloat16", qname)
    }
    memory = {name: weight_bytes(e.current_params(), e.runner.derived) for name, e in engines.items()}
    # a sync's stage on the worker (validate, cast, count finite, place; int8: and quantize) of
    # the same full-precision update, as a trainer sends it; best of 3, then dropped (abort)
    update = {path: np.asarray(a) for path, a in engines["float32"].current_params().items()}
    stage_s = {}
    for name, e in engines.items():
        seconds = []
        for _ in range(3):
            seconds.append(e.stage(e.version + 1, update).seconds)
            e.abort()
        stage_s[name] = min(seconds)
    for e in engines.values():
        e.shutdown()

    print(f"\nmodel: Qwen3-shaped ({args.checkpoint or args.shape}), CPU ({os.cpu_count()} cores), 1 device, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; best of {args.repeats}, engines alternating")
    print(f"{'batch':>5} {'float32 tok/s':>14} {'bfloat16 tok/s':>15} {qname + ' tok/s':>11} "
          f"{'vs f32':>7} {'vs bf16':>8} {'same tokens':>12} {'cpu steal':>10}")
    for r in rows:
        q, f, b = r[f"{qname}_tok_s"], r["float32_tok_s"], r["bfloat16_tok_s"]
        steal_text = "n/a" if r["cpu_steal_percent"] is None else f"{r['cpu_steal_percent']:.0f}%"
        print(f"{r['batch']:>5} {f:>14.1f} {b:>15.1f} {q:>11.1f} {q / f:>6.2f}x {q / b:>7.2f}x "
              f"{r['same_tokens_as_float32']:>8}/{r['batch']:<3} {steal_text:>10}")
    print("weights in memory (parameters and derived head copy): "
          + ", ".join(f"{name} {b / 2**20:.1f} MiB" for name, b in memory.items()))
    print(f"per-token logprob |difference| vs float32 over {ref.size} tokens (scoring float32's greedy "
          "completions): " + ", ".join(f"{name} mean {m['mean_abs']:.4f} max {m['max_abs']:.4f}"
                                      for name, m in mismatch.items()))
    print("a sync's stage of the full-precision update on the worker (validate, place, quantize): "
          + ", ".join(f"{name} {t:.2f} s" for name, t in stage_s.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "weight_bytes": memory, "logprob_mismatch": mismatch,
                                              "stage_seconds": stage_s}, indent=2))
    return 0
