"""HTTP serving load: the OpenAI-compatible server against the Python API, same fleet, same run.

    rollout bench serve [options]                     # or: python bench/bench_serve.py [options]
    rollout bench serve --tiny --concurrency 1 8 --requests 8 --max-tokens 16   # a quick check

Starts one fleet (default: 1 worker x 1 CPU device, the ~75M-parameter Qwen3-shaped checkpoint
of the engine benchmark made on the spot) and `rollout.serve` on 127.0.0.1. For each concurrency it
sends the same workload twice, alternating which side goes first: streamed completions through
the official async `openai` client (HTTP, SSE), and the same requests through the Python API
(`RolloutService.generate_stream` on the same event loop), after warm-up rounds until the engines
compile nothing new. Each request is a token-id prompt of
--prompt-len tokens, greedy, `ignore_eos`, exactly --max-tokens new tokens, so both sides do the
same engine work. Reported per side: requests/s, tokens/s, time to first token p50/p99 (request
sent -> first token received), and the HTTP overhead ratio = Python API tokens/s divided by
HTTP tokens/s (1.00 = no overhead). One JSON line per (concurrency, side), then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests in flight")
    p.add_argument("--requests", type=int, default=0, help="requests per concurrency and side (0: 4 x concurrency, >= 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--devices-per-worker", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=32, help="decode slots per engine")
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--checkpoint", type=Path, default=None, help="HF directory to serve instead of making one")
    p.add_argument("--tiny", action="store_true", help="serve the tiny test checkpoint (quick functional runs)")
    p.add_argument("--client-process", action="store_true",
                   help="run the HTTP clients in a separate process (as remote clients would be); by default "
                        "they share this process with the server and the Python API side")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def run_level(concurrency: int, count: int, one) -> dict[str, float]:
    """`count` requests, `concurrency` at a time; `one(i)` -> (ttft_s, tokens)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    ttfts: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            ttft, n = await one(i)
            ttfts.append(ttft)
            tokens += n

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return {"requests": count, "seconds": seconds, "requests_per_s": count / seconds, "tokens_per_s": tokens / seconds,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p99_ms": 1000 * percentile(ttfts, 99),
            "ttft_mean_ms": 1000 * statistics.fmean(ttfts)}


async def http_level(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
                     count: int) -> dict[str, float]:
    """One level through the official async `openai` client: streamed completions over HTTP."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)

    async def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        ttft, tokens = None, 0
        stream = await client.completions.create(model=model, prompt=prompts[i % len(prompts)], stream=True,
                                                 max_tokens=max_tokens, temperature=0.0,
                                                 extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in stream:
            n = sum(len(c.token_ids) for c in chunk.choices)
            if n and ttft is None:
                ttft = time.perf_counter() - start
            tokens += n
        return ttft or float("nan"), tokens

    try:
        return await run_level(concurrency, count, one)
    finally:
        await client.close()


def http_level_in_process(*args: object) -> dict[str, float]:
    """`http_level` on a fresh event loop (the entry point of the client process)."""
    return asyncio.run(http_level(*args))  # type: ignore[arg-type]


async def warm_up(server, concurrency: int, count: int, *sides) -> None:
    """Run the level on every side until the engines compile nothing new (each prefill and
    decode batch shape compiles once; a timed run must not include it), at most 5 rounds."""

    def compiled() -> int:
        return sum(w.get("compiled", 0) for w in server.service.status()["workers"])

    for _ in range(5):
        before = compiled()
        for side in sides:
            await side(concurrency, count)
        if compiled() == before:
            return


async def bench(args: argparse.Namespace, server, prompts: list[list[int]]) -> list[dict]:
    import rollout

    sampling = rollout.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    pool = None
    if args.client_process:  # the HTTP clients' parsing then does not share the server's interpreter
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    async def http(concurrency: int, count: int) -> dict[str, float]:
        level = (server.url, server.state.model_name, prompts, args.max_tokens, concurrency, count)
        if pool is None:
            return await http_level(*level)
        return await asyncio.get_running_loop().run_in_executor(pool, http_level_in_process, *level)

    async def python_one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        ttft, tokens = None, 0
        async for deltas in server.service.generate_stream(prompts[i % len(prompts)], sampling):
            n = sum(len(d.token_ids) for d in deltas)
            if n and ttft is None:
                ttft = time.perf_counter() - start
            tokens += n
        return ttft or float("nan"), tokens

    async def python(concurrency: int, count: int) -> dict[str, float]:
        return await run_level(concurrency, count, python_one)

    rows = []
    try:
        for level, concurrency in enumerate(args.concurrency):
            count = args.requests or max(8, 4 * concurrency)
            await warm_up(server, concurrency, count, python, http)
            sides = [("python", python), ("http", http)]
            for side, fn in sides if level % 2 == 0 else sides[::-1]:
                row = {"concurrency": concurrency, "side": side, **await fn(concurrency, count)}
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                rows.append(row)
    finally:
        if pool is not None:
            pool.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import rollout
    from rollout.testing import make_bench_checkpoint, make_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="rollout-bench-serve-"))
    if args.checkpoint is not None:
        ckpt = args.checkpoint
    elif args.tiny:
        ckpt = make_tiny_checkpoint(root / "tiny", "Qwen3ForCausalLM", seed=1)
    else:
        ckpt = make_bench_checkpoint(root / "qwen3-75m")
    longest = max(args.concurrency)
    server = rollout.serve(ckpt, port=0, served_model_name="bench", num_workers=args.workers,
                           devices_per_worker=args.devices_per_worker, accelerator="cpu",
                           max_batch=max(args.max_batch, 1), max_seq_len=args.prompt_len + args.max_tokens + 8,
                           decode_steps=args.decode_steps)
    try:
        vocab = server.service.model_config.vocab_size
        prompts = [[(17 * i + 31 * j) % (vocab - 10) + 5 for j in range(args.prompt_len)] for i in range(longest * 4)]
        rows = asyncio.run(bench(args, server, prompts))
    finally:
        server.shutdown()
    print(f"\n{args.workers} worker(s) x {args.devices_per_worker} device(s), {ckpt.name}, prompt {args.prompt_len} "
          f"tokens, {args.max_tokens} new tokens, greedy, streamed")
    print("| concurrency | Python API req/s | HTTP req/s | Python API tok/s | HTTP tok/s | TTFT p50 Python / HTTP (ms) "
          "| TTFT p99 Python / HTTP (ms) | HTTP overhead (Python tok/s / HTTP tok/s) |")
    print("|---|---|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        py = next(r for r in rows if r["concurrency"] == concurrency and r["side"] == "python")
        ht = next(r for r in rows if r["concurrency"] == concurrency and r["side"] == "http")
        print(f"| {concurrency} | {py['requests_per_s']:.2f} | {ht['requests_per_s']:.2f} | {py['tokens_per_s']:.1f} "
              f"| {ht['tokens_per_s']:.1f} | {py['ttft_p50_ms']:.1f} / {ht['ttft_p50_ms']:.1f} "
              f"| {py['ttft_p99_ms']:.1f} / {ht['ttft_p99_ms']:.1f} | {py['tokens_per_s'] / ht['tokens_per_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
