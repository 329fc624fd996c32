"""Multi-turn agent conversations on the paged engine, with and without the prefix cache.

The workload: --conversations conversations of --turns turns each, all running at once as
agents do (a conversation submits its next turn as soon as its last one finished). Every
conversation starts with the same --system-len-token system prompt and a --user-len-token user
message of its own; each turn samples --new-tokens tokens (greedy, EOS ignored), and the
conversation grows by exactly the sampled ids plus a --tool-len-token tool reply (random ids):
token ids throughout, nothing re-tokenized. So each turn's prompt is the previous turn's prompt
plus what came after it, which the prefix cache (EngineConfig.prefix_cache) keeps: only the new
tokens are prefilled.

Two engines run it one after the other in the same process, the same paged pool and config but
for the cache: prefill tokens computed (the positions prefills ran), generated tokens per second
over the whole run (prefill included, as an agent sees it), cache hits, and how many
conversations came out token-identical (greedy: the cached prefill's sums run in another order,
so a near-tie may flip a token, after which that conversation differs). Each engine first runs
the same shapes on other random tokens as a warm-up (compiles; no cache hit carries over).

The model is a small Qwen3 shape (hidden 512, 4 layers, 8 q / 4 KV heads of 64, intermediate
1536, vocab 32000; ~29M parameters, float32 on CPU), made on the spot.

    rollout bench agent                  # 32 conversations x 8 turns, 512-token system prompt (minutes)
    rollout bench agent --tiny           # a small model and workload: proves it runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from rollout.worker.cpu_malloc import keep_freed_memory

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHAPE: dict[str, Any] = dict(  # model config overrides for make_tiny_checkpoint
    vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
)
TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rollout bench agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-len", type=int, default=512, help="tokens of the system prompt every conversation shares")
    p.add_argument("--user-len", type=int, default=32, help="tokens of each conversation's first user message")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per turn")
    p.add_argument("--tool-len", type=int, default=32, help="tokens of the tool reply appended after each turn")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--max-prefill-batch", type=int, default=8)
    p.add_argument("--kv-pages", type=int, default=None,
                   help="pool size (default: every conversation at its longest, at once)")
    p.add_argument("--tiny", action="store_true", help="small model and workload (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.conversations, args.turns, args.system_len, args.user_len = 4, 3, 40, 8
        args.new_tokens, args.tool_len, args.page_size, args.decode_steps = 8, 8, 8, 4
    for name in ("conversations", "turns", "system_len", "user_len", "new_tokens", "tool_len", "page_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def max_seq_len(args: argparse.Namespace) -> int:
    """The longest sequence: the last turn's prompt plus its new tokens."""
    return args.system_len + args.user_len + args.turns * args.new_tokens + (args.turns - 1) * args.tool_len


def run_conversations(engine, args: argparse.Namespace, seed: int) -> tuple[list[list[int]], float]:
    """Every conversation's final token ids, and the seconds the whole workload took."""
    import numpy as np

    from rollout.engine import SamplingParams

    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    system = rng.integers(3, vocab, args.system_len).tolist()
    conversations = [system + rng.integers(3, vocab, args.user_len).tolist() for _ in range(args.conversations)]
    tools = rng.integers(3, vocab, (args.conversations, args.turns, args.tool_len)).tolist()
    sampling = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    turn = [0] * args.conversations
    start = time.perf_counter()
    pending: dict[Future, int] = {
        engine.submit(ids, sampling, prompt_index=i): i for i, ids in enumerate(conversations)
    }
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for future in done:
            i = pending.pop(future)
            conversations[i] = conversations[i] + list(future.result()[0].token_ids)  # the sampled ids, as sampled
            turn[i] += 1
            if turn[i] < args.turns:
                conversations[i] += tools[i][turn[i] - 1]
                pending[engine.submit(conversations[i], sampling, prompt_index=i)] = i
    return conversations, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # as the fleet's CPU workers run: see rollout.worker.cpu_malloc (before jax starts)
    with tempfile.TemporaryDirectory(prefix="rollout-bench-agent-") as root:  # the checkpoint: removed after
        return run(args, Path(root))


def run(args: argparse.Namespace, root: Path) -> int:
    import jax

    from rollout.engine import EngineConfig
    from rollout.engine.native.engine import Engine
    from rollout.engine.native.kv.paged.pool import pages_for
    from rollout.testing import make_tiny_checkpoint

    shape = TINY_SHAPE if args.tiny else SHAPE
    ckpt = make_tiny_checkpoint(root / "qwen3-agent", **shape)
    seq_len = max_seq_len(args)
    pages = args.kv_pages or args.conversations * pages_for(seq_len, args.page_size)
    results: dict[str, Any] = {"shape": shape, "workload": {
        k: getattr(args, k) for k in ("conversations", "turns", "system_len", "user_len", "new_tokens", "tool_len")
    }, "kv_pages": pages, "page_size": args.page_size, "max_seq_len": seq_len}
    finals: dict[str, list[list[int]]] = {}
    for side, prefix_cache in (("cache", True), ("no_cache", False)):
        config = EngineConfig(
            max_batch=args.conversations, max_seq_len=seq_len, decode_steps=args.decode_steps,
            max_prefill_batch=args.max_prefill_batch, kv_layout="paged", page_size=args.page_size,
            kv_pages=pages, prefix_cache=prefix_cache,
        )
        with Engine(ckpt, config, devices=jax.devices()[:1]) as engine:
            run_conversations(engine, args, seed=1)  # warm-up: the same shapes, other tokens
            before = engine.status()
            finals[side], seconds = run_conversations(engine, args, seed=0)
            after = engine.status()
        generated = after["tokens_generated"] - before["tokens_generated"]
        row: dict[str, Any] = dict(
            seconds=seconds, generated_tokens=generated, tok_s=generated / seconds,
            prefill_tokens=after["kv"]["prefill_tokens"] - before["kv"]["prefill_tokens"],
            preemptions=after["kv"]["preemptions"] - before["kv"]["preemptions"],
        )
        cache_after, cache_before = after["kv"]["prefix_cache"], before["kv"]["prefix_cache"]
        if cache_after is not None:
            row.update({k: cache_after[k] - cache_before[k] for k in ("hit_requests", "hit_tokens", "evictions")})
            row["cached_pages"] = cache_after["cached_pages"]
        results[side] = row
    on, off = results["cache"], results["no_cache"]
    results["prefill_reduction"] = off["prefill_tokens"] / max(1, on["prefill_tokens"])
    results["tok_s_ratio"] = on["tok_s"] / off["tok_s"]
    results["identical_conversations"] = sum(a == b for a, b in zip(finals["cache"], finals["no_cache"]))

    print(f"\nmodel: Qwen3 shape {shape}, float32, 1 CPU device; paged KV, {pages} pages of {args.page_size}")
    print(f"workload: {args.conversations} conversations x {args.turns} turns, shared system prompt "
          f"{args.system_len}, user {args.user_len}, {args.new_tokens} new tokens a turn, tool replies {args.tool_len}")
    print(f"{'prefix cache':>12} {'prefill tokens':>15} {'generated':>10} {'seconds':>8} {'tok/s':>8} "
          f"{'hit requests':>13} {'hit tokens':>11} {'evictions':>10}")
    for side, label in (("cache", "on"), ("no_cache", "off")):
        r = results[side]
        print(f"{label:>12} {r['prefill_tokens']:>15} {r['generated_tokens']:>10} {r['seconds']:>8.2f} "
              f"{r['tok_s']:>8.1f} {r.get('hit_requests', '-'):>13} {r.get('hit_tokens', '-'):>11} "
              f"{r.get('evictions', '-'):>10}")
    print(f"with the cache: {results['prefill_reduction']:.2f}x fewer prefill tokens, "
          f"{results['tok_s_ratio']:.2f}x tokens/s; {results['identical_conversations']}/{args.conversations} "
          f"conversations token-identical")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
