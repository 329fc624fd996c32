"""Paged vs contiguous KV cache on the same KV memory budget, and rollout vs transformers.

The model is a Qwen3 shape with head_dim 128 (hidden 1024, 16 q / 8 KV heads, 4 layers,
intermediate 3072, vocab 32000; ~70M parameters, float32 on CPU), made on the spot. Three parts:

(a) uniform lengths: --uniform-batch prompts of --prompt-len tokens, --uniform-new greedy new
    tokens each (EOS ignored). Contiguous: max_batch = the batch, max_seq_len = prompt + new.
    Paged: the same KV bytes as pages, the same max_batch. Both engines live side by side and
    take turns for --repeats timed rounds; tokens/s of each one's median round.
(b) long-tailed lengths with n = 8 samples per prompt: --groups prompts; each prompt's
    max_tokens is drawn once (seeded) from a long tail: 70% L/16, 20% L/4, 10% L, with
    L = --tail-max (its 8 samples share it), sampled at temperature 1 with a seed, EOS ignored.
    Contiguous: --contiguous-slots slots of prompt + L positions (that is the KV budget). Paged:
    the same bytes as pages, --paged-slots decode rows. The engines take turns for
    --tail-repeats timed rounds; tokens/s of each one's median round, peak concurrent sequences,
    preemptions. Two references measured in the same run (--no-ceiling skips them):
    "unlimited", the contiguous layout with --paged-slots slots of prompt + L positions (KV
    memory no limit) on the same workload, what memory alone gives the contiguous layout; and
    "peak rate", the decode rate of a full batch of --paged-slots rows with a short
    max_seq_len: two greedy runs of --prompt-len prompts, one of decode-steps new tokens and one
    of --peak-new more, rate = rows x peak-new / the difference of their times (prefill and
    start-up cancel). No workload decodes faster at that concurrency, whatever its KV layout.
(c) rollout (paged and contiguous) against transformers' `generate` at batch 1, 4, 16 (greedy,
    same prompts; identical tokens counted). With it, the host measured in the same run (CPU
    model, memory bandwidth, float32 matmul rate at the largest batch in JAX and torch) and each
    row's fraction of the bandwidth and matmul rooflines (rollout.bench.roofline; --no-host
    skips it).

Each engine runs the work once as a warm-up before it is timed (compilation is not timed).

    rollout bench paged                  # all three, full size (minutes; take figures on a quiet host)
    rollout bench paged --tiny           # a small model and workload: proves it runs
    rollout bench paged --parts tail     # only (b)

The transformers reference needs torch and transformers (`pip install "rollout[bench]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

from rollout.worker.cpu_malloc import keep_freed_memory

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHAPE: dict[str, Any] = dict(  # model config overrides for make_tiny_checkpoint
    vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
)
TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rollout bench paged", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", nargs="+", default=["uniform", "tail", "transformers"],
                   choices=["uniform", "tail", "transformers"], help="which of (a), (b), (c) to run")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--uniform-batch", type=int, default=16)
    p.add_argument("--uniform-new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="(a): timed rounds per layout, taking turns; the median is reported")
    p.add_argument("--tail-repeats", type=int, default=3, help="(b): timed rounds per layout, taking turns; the median is reported")
    p.add_argument("--groups", type=int, default=16, help="(b): prompts, 8 samples each")
    p.add_argument("--tail-max", type=int, default=512, help="(b): the longest max_tokens, L")
    p.add_argument("--contiguous-slots", type=int, default=16, help="(b): contiguous slots (>= 8); sets the KV budget")
    p.add_argument("--paged-slots", type=int, default=128, help="(b): paged decode rows")
    p.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                   help="(b): skip the two references (unlimited KV; the peak rate of --paged-slots rows)")
    p.add_argument("--peak-new", type=int, default=32, help="(b): decode tokens per row the peak rate is timed on")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="(c): batch sizes")
    p.add_argument("--new-tokens", type=int, default=64, help="(c): greedy new tokens")
    p.add_argument("--no-host", dest="host", action="store_false",
                   help="(c): skip measuring the host (bandwidth, matmul peak) and the roofline fractions")
    p.add_argument("--tiny", action="store_true", help="small model and workload (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.uniform_batch, args.uniform_new, args.groups, args.tail_max = 4, 16, 2, 64
        args.contiguous_slots, args.paged_slots, args.batches, args.new_tokens = 8, 32, [1, 4], 8
        args.prompt_len, args.page_size, args.decode_steps, args.peak_new, args.repeats, args.tail_repeats = 8, 8, 4, 8, 2, 2
    return args


class PeakActive:
    """Polls an engine's active slots in a thread: the most sequences decoding at once."""

    def __init__(self, engine):
        self.engine, self.peak, self._stop = engine, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.engine.status()["active_slots"])
            time.sleep(0.002)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn):
    fn()  # warm-up: compiles every shape the timed run uses
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def host_roofline(args: argparse.Namespace, cfg, params: int, rows: list[dict]) -> tuple[dict, list[str]]:
    """(c)'s roofline: measures the host, adds each row's fields per side ("<side>_roofline");
    returns the host's JSON and the lines to print."""
    from rollout.bench.roofline import roofline_table

    return roofline_table(cfg, params, args, rows, [(side, f"{side}_tok_s", f"{side}_ratio") for side in ("paged", "contiguous")] + [("transformers", "transformers_tok_s", None)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # as the fleet's CPU workers run: see rollout.worker.cpu_malloc (before jax starts)
    with tempfile.TemporaryDirectory(prefix="rollout-bench-paged-") as root:  # the checkpoint: removed after
        return run(args, Path(root))


def run(args: argparse.Namespace, root: Path) -> int:
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from rollout.engine import EngineConfig, SamplingParams
    from rollout.engine.native.engine import Engine
    from rollout.engine.native.kv.paged import memory
    from rollout.models.config import ModelConfig
    from rollout.testing import make_tiny_checkpoint

    shape = TINY_SHAPE if args.tiny else SHAPE
    ckpt = make_tiny_checkpoint(root / "qwen3-hd128", **shape)
    cfg = ModelConfig.from_pretrained(ckpt)
    device = jax.devices()[:1]
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"shape": shape}  # JSON-shaped: printed and dumped below

    def engine(max_batch: int, max_seq_len: int, **kv) -> Engine:
        config = EngineConfig(max_batch=max_batch, max_seq_len=max_seq_len, decode_steps=args.decode_steps,
                              max_prefill_batch=16, **kv)
        return Engine(ckpt, config, devices=device)

    def same_budget_pages(slots: int, max_seq_len: int) -> int:
        budget = memory.contiguous_bytes(cfg, slots, max_seq_len, "float32")
        return memory.pages_in_budget(cfg, args.page_size, "float32", budget)

    def alternate(name: str, sides: dict[str, dict], max_seq_len: int, work, repeats: int) -> dict[str, dict]:
        """The engines of `sides` side by side: a warm-up each (compiles every shape), then
        `repeats` rounds taking turns (the host's drift hits all alike); each side's median
        round is reported, with its peak of concurrent sequences and the preemptions of all
        timed rounds."""
        engines = {side: engine(max_seq_len=max_seq_len, **kw) for side, kw in sides.items()}
        try:
            for eng in engines.values():
                work(eng)
            before = {side: eng.status()["kv"].get("preemptions", 0) for side, eng in engines.items()}
            runs: dict[str, list[tuple[float, int, int]]] = {side: [] for side in sides}
            for _ in tqdm(range(repeats), desc=name, unit="round"):
                for side, eng in engines.items():
                    with PeakActive(eng) as peak:
                        start = time.perf_counter()
                        outs = work(eng)
                        seconds = time.perf_counter() - start
                    runs[side].append((seconds, sum(len(o.token_ids) for o in outs), peak.peak))
            out = {}
            for side, eng in engines.items():
                seconds, tokens, peak_seqs = sorted(runs[side])[len(runs[side]) // 2]
                kv = eng.status()["kv"]
                out[side] = dict(tok_s=tokens / seconds, seconds=seconds, tokens=tokens,
                                 peak_concurrent=max(peak_seqs, kv.get("peak_active", 0)),
                                 preemptions=kv.get("preemptions", 0) - before[side],
                                 rounds=[round(r[0], 3) for r in runs[side]])
            return out
        finally:
            for eng in engines.values():
                eng.shutdown()

    def run_both(name: str, prompts, sampling, contiguous_slots: int, paged_slots: int, max_seq_len: int) -> dict:
        pages = same_budget_pages(contiguous_slots, max_seq_len)
        sides = {
            "contiguous": dict(max_batch=contiguous_slots),
            "paged": dict(max_batch=paged_slots, kv_layout="paged", page_size=args.page_size, kv_pages=pages),
        }
        row: dict[str, Any] = alternate(name, sides, max_seq_len, lambda eng: eng.generate(prompts, sampling), args.repeats)
        for side in sides:
            row[side]["kv_positions"] = pages * args.page_size
        row["tok_s_ratio"] = row["paged"]["tok_s"] / row["contiguous"]["tok_s"]
        row["concurrency_ratio"] = row["paged"]["peak_concurrent"] / max(1, row["contiguous"]["peak_concurrent"])
        return row

    # Every workload is drawn here, in one order, so a part run alone gets the full run's workload.
    uniform_prompts = rng.integers(3, 400, (args.uniform_batch, args.prompt_len)).tolist()
    L = args.tail_max
    tail_lengths = rng.choice([max(1, L // 16), max(1, L // 4), L], size=args.groups, p=[0.7, 0.2, 0.1])
    tail_lengths[0] = L  # at least one group runs to the limit
    tail_prompts = rng.integers(3, 400, (args.groups, args.prompt_len)).tolist()
    hf_prompts = rng.integers(3, 400, (max(args.batches), args.prompt_len)).tolist()

    if "uniform" in args.parts:
        prompts = uniform_prompts
        sampling = SamplingParams(max_tokens=args.uniform_new, temperature=0.0, ignore_eos=True)
        results["uniform"] = run_both("(a) uniform", prompts, sampling, args.uniform_batch, args.uniform_batch,
                                      args.prompt_len + args.uniform_new)

    if "tail" in args.parts:
        lengths, prompts = tail_lengths, tail_prompts
        row: dict = {"max_tokens": lengths.tolist()}
        # One request per prompt with its own max_tokens: submit each, collect all.
        from concurrent.futures import wait

        def run_tail(eng):
            futures = [
                eng.submit(p, SamplingParams(max_tokens=int(n), temperature=1.0, seed=i, n=8, ignore_eos=True), prompt_index=i)
                for i, (p, n) in enumerate(zip(prompts, lengths))
            ]
            wait(futures)
            return [c for f in futures for c in f.result()]

        pages = same_budget_pages(args.contiguous_slots, args.prompt_len + L)
        sides = {
            "contiguous": dict(max_batch=args.contiguous_slots),
            "paged": dict(max_batch=args.paged_slots, kv_layout="paged", page_size=args.page_size, kv_pages=pages),
        }
        if args.ceiling:  # the same workload with no KV limit: contiguous slots for every row
            sides["unlimited"] = dict(max_batch=args.paged_slots)
        row.update(alternate("(b) long tail, n=8", sides, args.prompt_len + L, run_tail, args.tail_repeats))
        for side in sides:
            row[side]["kv_positions"] = pages * args.page_size if side != "unlimited" else args.paged_slots * (args.prompt_len + L)
        row["tok_s_ratio"] = row["paged"]["tok_s"] / row["contiguous"]["tok_s"]
        row["concurrency_ratio"] = row["paged"]["peak_concurrent"] / max(1, row["contiguous"]["peak_concurrent"])
        if args.ceiling:
            # The decode rate of a full batch of paged-slots rows, KV no limit (short sequences):
            # the difference of a short and a long run, so the prefill and start-up cancel.
            peak_prompts = np.resize(np.asarray(prompts), (args.paged_slots, args.prompt_len)).tolist()
            short, long = args.decode_steps, args.decode_steps + args.peak_new
            with engine(max_batch=args.paged_slots, max_seq_len=args.prompt_len + long) as eng:
                times = {
                    n: timed(lambda n=n: eng.generate(peak_prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))[1]
                    for n in (short, long)
                }
            seconds = times[long] - times[short]  # not positive when the difference drowns in noise (--tiny)
            rate = args.paged_slots * args.peak_new / seconds if seconds > 0 else float("nan")
            row["peak_rate"] = dict(tok_s=rate, seconds=seconds,
                                    tokens=args.paged_slots * args.peak_new, rows=args.paged_slots)
            row["unlimited_ratio"] = row["unlimited"]["tok_s"] / row["contiguous"]["tok_s"]
            row["paged_of_unlimited"] = row["paged"]["tok_s"] / row["unlimited"]["tok_s"]
            row["peak_ratio"] = row["peak_rate"]["tok_s"] / row["contiguous"]["tok_s"]
        results["tail"] = row

    if "transformers" in args.parts:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        top = max(args.batches)
        prompts = hf_prompts
        sampling = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        max_seq = args.prompt_len + args.new_tokens

        def run_hf(batch: int) -> list[list[int]]:
            ids = torch.tensor(prompts[:batch])
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  eos_token_id=None, pad_token_id=0)
            return out[:, args.prompt_len:].tolist()

        rows = []
        engines = {
            "paged": engine(top, max_seq, kv_layout="paged", page_size=args.page_size),
            "contiguous": engine(top, max_seq),
        }
        params = sum(int(np.prod(leaf.shape)) for leaf in engines["contiguous"].spec.leaves)
        try:
            for batch in tqdm(args.batches, desc="(c) vs transformers", unit="batch"):
                ref, t_ref = timed(lambda batch=batch: run_hf(batch))
                row = dict(batch=batch, transformers_tok_s=batch * args.new_tokens / t_ref)
                for side, eng in engines.items():
                    outs, t = timed(lambda eng=eng, batch=batch: [list(c.token_ids) for c in eng.generate(prompts[:batch], sampling)])
                    row[f"{side}_tok_s"] = batch * args.new_tokens / t
                    row[f"{side}_ratio"] = t_ref / t
                    row[f"{side}_identical"] = f"{sum(a == b for a, b in zip(outs, ref))}/{batch}"
                rows.append(row)
        finally:
            for eng in engines.values():
                eng.shutdown()
        results["transformers"] = rows
        if args.host:
            results["host"], roofline_text = host_roofline(args, cfg, params, rows)

    print(f"\nmodel: Qwen3 shape {shape}, float32, 1 CPU device, page size {args.page_size}, "
          f"decode steps {args.decode_steps}")
    for part in ("uniform", "tail"):
        if part in results:
            r = results[part]
            print(f"\n({'a' if part == 'uniform' else 'b'}) {part}: same KV budget "
                  f"({r['contiguous']['kv_positions']} positions)")
            print(f"{'layout':>11} {'tok/s':>9} {'seconds':>8} {'tokens':>7} {'peak seqs':>10} {'preemptions':>12} "
                  f"{'KV positions':>13}")
            for side in ("contiguous", "paged", "unlimited"):
                if side in r:
                    s = r[side]
                    print(f"{side:>11} {s['tok_s']:>9.1f} {s['seconds']:>8.2f} {s['tokens']:>7} "
                          f"{s['peak_concurrent']:>10} {s['preemptions']:>12} {s['kv_positions']:>13}")
            print(f"paged / contiguous: tokens/s {r['tok_s_ratio']:.2f}x, concurrency {r['concurrency_ratio']:.2f}x")
            if part == "tail" and "unlimited" in r:
                u, peak = r["unlimited"], r["peak_rate"]
                print(f"references, same run: unlimited KV ({args.paged_slots} contiguous slots, {u['kv_positions']} positions) "
                      f"{u['tok_s']:.1f} tok/s = {r['unlimited_ratio']:.2f}x contiguous (paged reaches "
                      f"{r['paged_of_unlimited']:.2f}x of it); peak decode rate of {peak['rows']} rows (full "
                      f"batch, prefill excluded) {peak['tok_s']:.1f} tok/s = {r['peak_ratio']:.2f}x contiguous")
    if "transformers" in results:
        print(f"\n(c) greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens")
        print(f"{'batch':>5} {'transformers':>13} {'paged':>9} {'ratio':>6} {'same':>6} {'contiguous':>11} {'ratio':>6} {'same':>6}")
        for r in results["transformers"]:
            print(f"{r['batch']:>5} {r['transformers_tok_s']:>13.1f} {r['paged_tok_s']:>9.1f} {r['paged_ratio']:>5.2f}x "
                  f"{r['paged_identical']:>6} {r['contiguous_tok_s']:>11.1f} {r['contiguous_ratio']:>5.2f}x "
                  f"{r['contiguous_identical']:>6}")
    if "host" in results:
        print("\n" + "\n".join(roofline_text))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
