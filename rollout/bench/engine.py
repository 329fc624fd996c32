"""Engine throughput against transformers' `generate` on the same checkpoint and prompts.

Both run greedy decoding of the same number of new tokens (EOS ignored) from the same prompts,
on the CPU, measured in one run after one warm-up each (so compilation is not timed; the
warm-up's time, compilation included, is printed as it happens and kept in the JSON). The model
is a Qwen3-shaped ~75M-parameter checkpoint made on the spot (rollout.bench.checkpoints; `--shape
qwen3-128` for the head_dim-128 one of ~96M). The reference needs torch and transformers
(`pip install "rollout[bench]"`).

On an accelerator, `--platform gpu` runs JAX on the GPU and transformers on the same GPU
(rollout.bench.devices), in bfloat16 unless `--dtype` says otherwise, on Qwen3-0.6B- and
Qwen3-8B-shaped random checkpoints (`--shape qwen3-0.6b`, `qwen3-8b`; drawn on the device,
written in bfloat16): see rollout/bench/accelerator.sh and docs/benchmarks.md. Both sides load
the checkpoint in the benchmark's dtype (the engine's EngineConfig.dtype, transformers' dtype=).

In the same run it measures the host (rollout.bench.host: CPU model, memory bandwidth, float32
matmul rate at the decode shape in JAX and torch) and prints each row's fraction of the
bandwidth roofline (what counts at batch 1) and of the best matmul rate (what counts at the
largest batch) beside the ratio to transformers (rollout.bench.roofline); `--no-host` skips it.

    rollout bench engine                              # batch 1 and 16, 64 new tokens
    rollout bench engine --batches 1 4 16 --new-tokens 128
    rollout bench engine --shape qwen3-128 --batches 1 4 16 64
    rollout bench engine --moe --batches 1 4 16 64    # Qwen3-MoE (see MOE_SHAPE) instead
    rollout bench engine --batch-invariant --batches 1 4 16 64   # + the batch-invariant mode's cost
    rollout bench engine --quantization int8 --batches 1 4 16 64   # float32 vs bfloat16 vs int8
    python -m rollout.bench engine --platform gpu --shape qwen3-8b --batches 1 16 64 --json out.json

`--moe` measures a Qwen3-MoE model (`MOE_SHAPE`: 32 experts, top-4, ~205M parameters of which
~73M are used per token) that transformers itself writes (save_pretrained), with its weights
drawn so that greedy tokens and routes are clearly decided (as the tests' MoE checkpoints). In
the same run it also times a dense Qwen3 with the same ACTIVE parameters (rollout.bench.dense_active:
intermediate = top_k x moe_intermediate, all else equal) on the rollout engine, and prints the
MoE / dense-active tokens/s ratio (`--no-dense-reference` skips it). Memory at batch 64: ~0.8 GB
of MoE weights each for rollout and transformers, ~0.3 GB for the dense twin, KV caches of a few
MB; the CPU grouped matmul reads each routed expert's matrices in place (no gathered copies).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rollout.bench.checkpoints import SHAPES
from rollout.bench.devices import PLATFORMS, describe, synchronize, use_platform
from rollout.worker.cpu_malloc import keep_freed_memory

# Prompt token ids are drawn below this: within the bench tokenizer's few hundred tokens.
PROMPT_IDS = 400
# The MoE shape: hidden 1024, 16 q / 4 kv heads of 128, 32 experts top-4 of width 384,
# 4 layers (all sparse), vocab 32k, tied embeddings, float32.
MOE_SHAPE: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384,
    num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
    num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], tie_word_embeddings=True, max_position_embeddings=4096,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rollout bench engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes to measure")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size and side (best is kept)")
    p.add_argument("--decode-steps", type=int, default=8, help="engine decode steps per host round trip")
    p.add_argument("--checkpoint", type=Path, default=None, help="reuse this HF directory instead of making one")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-75m", help="the checkpoint made (not with --checkpoint)")
    p.add_argument("--platform", choices=sorted(PLATFORMS), default="cpu",
                   help="where JAX runs (gpu: transformers on the same GPU; see rollout.bench.devices)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and KV cache of both sides, and of the checkpoint made "
                   "(default: float32 on cpu, bfloat16 on gpu and tpu)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="make the checkpoint here (reused by a later run of the same shape and dtype) "
                   "instead of in a fresh temporary directory")
    p.add_argument("--no-host", dest="host", action="store_false",
                   help="skip measuring the host (bandwidth, matmul peak) and the roofline fractions")
    p.add_argument("--moe", action="store_true", help="a Qwen3-MoE model (MOE_SHAPE) instead of a dense --shape")
    p.add_argument("--no-dense-reference", dest="dense_reference", action="store_false",
                   help="with --moe: skip the dense model of the same active parameters")
    p.add_argument("--batch-invariant", action="store_true",
                   help="also time a second engine with batch_invariant=True against the default one, "
                   "alternating, and print the mode's cost (time on / time off) per batch")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    p.add_argument("--quantization", choices=["int8", "fp8"], default=None,
                   help="instead: float32, bfloat16 and this quantized engine side by side (rollout.bench.quantized)")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = PLATFORMS[args.platform].default_dtype
    return args


def distinct_prompts(count: int, length: int, high: int = PROMPT_IDS, seed: int = 0) -> list[list[int]]:
    """`count` different prompts of `length` token ids in [0, high), drawn as the benchmark
    always drew them (one (count, length) draw of seed 0); repeated rows are drawn again.

    >>> distinct_prompts(3, 4) == distinct_prompts(3, 4)
    True
    >>> sorted(p[0] for p in distinct_prompts(5, 1, high=5))
    [0, 1, 2, 3, 4]
    """
    import numpy as np

    if count > high**length:
        raise ValueError(f"{count} distinct prompts of {length} ids below {high} do not exist; "
                         "pass a longer --prompt-len")
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, high, (count, length)).tolist()
    seen: set[tuple[int, ...]] = set()
    for i, prompt in enumerate(prompts):
        while tuple(prompt) in seen:
            prompt = rng.integers(0, high, length).tolist()
        prompts[i] = prompt
        seen.add(tuple(prompt))
    return prompts


def progress(message: str) -> None:
    """A line on stderr, at once: where the run's time goes (checkpoint, loading, compilation)."""
    print(f"[bench engine {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    return fields[7], sum(fields)


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """CPU time the hypervisor gave to other guests between two cpu_times() readings, in %."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def interleaved_best(ours, reference, repeats: int) -> tuple[float, float]:
    """Best time of each, alternating them so that slow phases of a shared machine hit both."""
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("reference", reference)):
            time.sleep(0.3)  # let the other side's spinning worker threads go idle
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return min(times["ours"]), min(times["reference"])


def decode_rate(batch: int, new_tokens: int, run_seconds: float, prefill_seconds: float) -> float | None:
    """Tokens/s of the decode steps alone: the tokens after the first (which the prefill samples)
    over the run's time less the prefill's (both best-of times); None where they leave no time
    (a run of one token, or timing noise).

    >>> decode_rate(4, 65, 2.0, 0.4)
    160.0
    >>> decode_rate(1, 1, 0.5, 0.5) is None
    True
    """
    decode_seconds = run_seconds - prefill_seconds
    if new_tokens < 2 or decode_seconds <= 0:
        return None
    return batch * (new_tokens - 1) / decode_seconds


def host_roofline(
    args: argparse.Namespace, model_config, params: int, rows: list[dict], bandwidth_samples: list[float]
) -> tuple[dict, list[str]]:
    """Measures the host, adds each row's roofline fields (under "roofline"); returns the host's
    JSON and the lines to print (transformers' rows too: the same arithmetic on its rate)."""
    from rollout.bench.roofline import roofline_table

    return roofline_table(model_config, params, args, rows, [("rollout", "rollout_tok_s", "ratio"), ("transformers", "transformers_tok_s", None)],
                          bandwidth_samples)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    platform = use_platform(args.platform)  # before jax starts
    if args.platform == "cpu":
        keep_freed_memory()  # as the fleet's CPU workers run: see rollout.worker.cpu_malloc (before jax starts)
    if args.quantization:
        from rollout.bench.quantized import run

        def steal_reading() -> Any:
            before = cpu_times()
            return lambda: steal_percent(before, cpu_times())

        return run(args, SHAPES[args.shape], steal_reading)
    try:
        import torch
        import transformers
    except ImportError as err:
        sys.exit(f"error: the engine benchmark's reference needs torch and transformers ({err}); "
                 'install them with pip install "rollout[bench]"')
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from rollout.bench.checkpoints import timed_checkpoint
    from rollout.bench.host import BandwidthProbe
    from rollout.engine import EngineConfig, SamplingParams
    from rollout.engine.native.engine import Engine

    torch.set_num_threads(os.cpu_count() or 1)
    device = platform.torch_device
    progress(f"JAX on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), transformers on {device}, "
             f"{args.dtype}")
    root = Path(tempfile.mkdtemp(prefix="rollout-bench-")) if args.workdir is None else args.workdir
    seconds: dict[str, float] = {}  # where the run's time went, besides the timed runs
    if args.checkpoint:
        ckpt = args.checkpoint
    elif args.moe:
        ckpt = make_moe_bench_checkpoint(root / "qwen3-moe", torch, transformers)
    else:
        ckpt, seconds["checkpoint"] = timed_checkpoint(root / f"{args.shape}-{args.dtype}", args.shape, args.dtype)
        progress(f"checkpoint {args.shape} ({args.dtype}) at {ckpt}: {seconds['checkpoint']:.1f} s")
    max_batch = max(args.batches)
    max_seq = args.prompt_len + args.new_tokens
    prompts = distinct_prompts(max_batch, args.prompt_len)
    sampling = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    start = time.perf_counter()
    engine = Engine(
        ckpt,
        EngineConfig(max_batch=max_batch, max_seq_len=max_seq, decode_steps=args.decode_steps, dtype=args.dtype),
        devices=jax.devices()[:1],
    )
    seconds["rollout_load"] = time.perf_counter() - start
    progress(f"rollout engine loaded: {seconds['rollout_load']:.1f} s")
    invariant = None
    if args.batch_invariant:
        invariant = Engine(
            ckpt,
            EngineConfig(max_batch=max_batch, max_seq_len=max_seq, decode_steps=args.decode_steps, batch_invariant=True,
                         dtype=args.dtype),
            devices=jax.devices()[:1],
        )
    start = time.perf_counter()
    torch_dtype = getattr(torch, args.dtype)
    hf: Any = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype)
    hf = hf.to(device=device, dtype=torch_dtype).eval()  # loaded on the CPU: onto the device, in the dtype for sure
    synchronize(torch, device)
    seconds["transformers_load"] = time.perf_counter() - start
    progress(f"transformers loaded on {device}: {seconds['transformers_load']:.1f} s")
    params = sum(int(np.prod(leaf.shape)) for leaf in engine.spec.leaves)
    dense = None
    if args.moe and args.dense_reference and not args.checkpoint:
        from rollout.bench.dense_active import DenseActiveReference

        dense = DenseActiveReference.start(root / "qwen3-dense-active", MOE_SHAPE, engine.config, prompts, sampling)

    first_token = dataclasses.replace(sampling, max_tokens=1)  # the prefill alone (it samples the first token)

    def run_engine(batch: int, params: SamplingParams = sampling) -> list[list[int]]:
        return [list(c.token_ids) for c in engine.generate(prompts[:batch], params)]

    def run_hf(batch: int, new_tokens: int = args.new_tokens) -> list[list[int]]:
        ids = torch.tensor(prompts[:batch], device=device)
        with torch.no_grad():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
            )
        synchronize(torch, device)
        return out[:, args.prompt_len :].tolist()

    rows: list[dict[str, Any]] = []
    # On the CPU, the memory bandwidth is probed after each batch's timed runs too (see roofline_table).
    probe = BandwidthProbe() if args.host and args.platform == "cpu" else None
    bandwidth_samples: list[float] = []

    def write_json(host_json: dict | None, complete: bool = True) -> None:
        """The results so far (after each batch, so a run stopped by a timeout leaves its rows)."""
        if args.json:
            meta = dict(shape=None if args.checkpoint or args.moe else args.shape, checkpoint=str(ckpt), params=params,
                        dtype=args.dtype, platform=args.platform, prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, repeats=args.repeats, decode_steps=args.decode_steps,
                        seconds=seconds, complete=complete)
            args.json.write_text(json.dumps({"run": meta, "host": host_json, "rows": rows}, indent=2))

    for batch in tqdm(args.batches, desc="batch sizes", unit="batch"):
        start = time.perf_counter()
        ours_tokens = run_engine(batch)  # warm-up: compiles this batch's shapes
        first_ours = time.perf_counter() - start
        ref_tokens = run_hf(batch)
        first_ref = time.perf_counter() - start - first_ours
        progress(f"batch {batch}: first call (compiles) rollout {first_ours:.1f} s, transformers {first_ref:.1f} s")
        same = sum(a == b for a, b in zip(ours_tokens, ref_tokens))
        before = cpu_times()
        t_ours, t_ref = interleaved_best(lambda b=batch: run_engine(b), lambda b=batch: run_hf(b), args.repeats)
        steal = steal_percent(before, cpu_times())
        # The prefill alone (one token), so the roofline can take the decode steps by themselves.
        run_engine(batch, first_token)  # warm-up of the one-token path (its prefill shapes ran above)
        p_ours, p_ref = interleaved_best(lambda b=batch: run_engine(b, first_token), lambda b=batch: run_hf(b, 1),
                                         args.repeats)
        if probe is not None:
            bandwidth_samples.append(probe(repeats=3))
        n = batch * args.new_tokens
        rows.append(
            dict(batch=batch, new_tokens=args.new_tokens, rollout_tok_s=n / t_ours, transformers_tok_s=n / t_ref,
                 ratio=t_ref / t_ours, identical_outputs=f"{same}/{batch}", cpu_steal_percent=steal,
                 rollout_first_call_s=first_ours, transformers_first_call_s=first_ref,
                 rollout_prefill_s=p_ours, transformers_prefill_s=p_ref,
                 rollout_decode_tok_s=decode_rate(batch, args.new_tokens, t_ours, p_ours),
                 transformers_decode_tok_s=decode_rate(batch, args.new_tokens, t_ref, p_ref))
        )
        progress(f"batch {batch}: rollout {n / t_ours:.1f} tok/s, transformers {n / t_ref:.1f} tok/s, "
                 f"same tokens {same}/{batch}")
        if invariant is not None:
            inv_tokens = [list(c.token_ids) for c in invariant.generate(prompts[:batch], sampling)]  # warm-up
            t_off, t_on = interleaved_best(
                lambda b=batch: run_engine(b),
                lambda b=batch: invariant.generate(prompts[:b], sampling),
                args.repeats,
            )
            rows[-1].update(invariant_tok_s=n / t_on, invariant_default_tok_s=n / t_off, invariant_cost=t_on / t_off,
                            invariant_same_tokens=f"{sum(a == b for a, b in zip(inv_tokens, ours_tokens))}/{batch}")
        if dense is not None:
            rows[-1].update(dense.measure(batch, functools.partial(run_engine, batch), args.repeats,
                                          interleaved_best, args.new_tokens))
        write_json(None, complete=False)
    model_config = engine.model_config
    engine.shutdown()
    host = host_roofline(args, model_config, params, rows, bandwidth_samples) if args.host else None

    kind = f"Qwen3-MoE ({engine.model_config.num_experts} experts, top-{engine.model_config.num_experts_per_tok})" \
        if engine.model_config.is_moe else f"Qwen3-shaped ({args.checkpoint or args.shape})"
    print(f"\nmodel: {kind}, {params / 1e6:.1f}M params, {args.dtype}, {describe(platform, os.cpu_count() or 1)}, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; rollout on 1 device")
    print("best of --repeats timed runs each, rollout and transformers alternating; 'cpu steal' is the CPU "
          "time the hypervisor gave to other guests meanwhile (high steal makes the figures unreliable)")
    print(f"{'batch':>5} {'rollout tok/s':>14} {'transformers tok/s':>19} {'ratio':>7} {'same tokens':>12} {'cpu steal':>10}")
    for r in rows:
        steal_text = "n/a" if r["cpu_steal_percent"] is None else f"{r['cpu_steal_percent']:.0f}%"
        print(f"{r['batch']:>5} {r['rollout_tok_s']:>14.1f} {r['transformers_tok_s']:>19.1f} "
              f"{r['ratio']:>6.2f}x {r['identical_outputs']:>12} {steal_text:>10}")
    if invariant is not None:
        invariant.shutdown()
        print("\nbatch-invariant mode (the same engine with batch_invariant=True, timed alternating with the default)")
        print(f"{'batch':>5} {'default tok/s':>14} {'invariant tok/s':>16} {'cost':>7} {'same tokens':>12}")
        for r in rows:
            print(f"{r['batch']:>5} {r['invariant_default_tok_s']:>14.1f} {r['invariant_tok_s']:>16.1f} "
                  f"{r['invariant_cost']:>6.2f}x {r['invariant_same_tokens']:>12}")
    if host is not None:
        print("\n" + "\n".join(host[1]))
    if dense is not None:
        from rollout.bench.dense_active import active_params

        print("\n".join(dense.lines(rows, params, active_params(engine.model_config, params))))
        dense.shutdown()
    write_json(host[0] if host else None)
    return 0


def make_moe_bench_checkpoint(directory: Path, torch: Any, transformers: Any) -> Path:
    """A Qwen3-MoE checkpoint of MOE_SHAPE written by transformers' save_pretrained, with the
    bench tokenizer. Weights: embeddings N(0, 1), projections N(0, 1/fan_in) (residual outputs
    x12, the router x4), norms 1 + N(0, 0.1): peaked next-token and routing distributions."""
    import math

    from rollout.testing import make_tiny_checkpoint

    make_tiny_checkpoint(directory, "Qwen3ForCausalLM", num_hidden_layers=1, vocab_size=MOE_SHAPE["vocab_size"])
    for stale in [*directory.glob("model*.safetensors"), directory / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    generation = (directory / "generation_config.json").read_text()
    eos = json.loads(generation)["eos_token_id"][0]
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**MOE_SHAPE, eos_token_id=eos)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            x = torch.randn(tuple(param.shape), generator=gen)
            if name.endswith("norm.weight"):
                x = 1.0 + 0.1 * x
            elif "embed_tokens" not in name and name != "lm_head.weight":
                gain = 12.0 if name.endswith(("o_proj.weight", "down_proj")) else 4.0 if name.endswith("mlp.gate.weight") else 1.0
                x = x * (gain / math.sqrt(param.shape[-1]))
            param.copy_(x)
    model.save_pretrained(directory)
    (directory / "generation_config.json").write_text(generation)
    return directory


if __name__ == "__main__":
    sys.exit(main())
