"""Start an engine on dummy weights, swap the real ones in place, and generate with them.

    python -m trainer_stub.dummy_then_real --model DIR_OR_REPO [--engine sglang-jax]

This is how an RL job starts when the trainer owns the weights: the engine comes up from shapes
alone (`load_format="dummy"`), compiles, and the real weights arrive later by a weight sync.
Here they come straight from the HF checkpoint (`Engine.stage_checkpoint` + `commit`). Each
phase prints one JSON line:

    {"phase": "engine_ready_dummy", "leaves": ..., ...}     engine up, dummy weights, warmed up
    {"phase": "weights_swapped", ...}                        real weights in; tree and shapes kept
    {"phase": "generate_result", "text": ..., ...}           greedy reply to the chat prompt

The run checks that the swap kept the number of leaves and every shape, dtype and sharding,
and that the generate after the swap compiled nothing new (the engine's compile counter before
the swap and after the generate); it exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rollout.engine.backend import BACKENDS
from rollout.fleet_config import FleetConfig

CHAT_PROMPT = [{"role": "user", "content": "你是谁"}]


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, ensure_ascii=False), flush=True)


def leaf_layout(params: dict[str, Any]) -> dict[str, tuple]:
    """path -> (shape, dtype, sharding) of every leaf."""
    return {p: (tuple(a.shape), str(a.dtype), a.sharding) for p, a in params.items()}


def run(model: str, *, devices: int = 2, max_tokens: int = 32, max_seq_len: int = 256, engine: str = FleetConfig.engine) -> int:
    import jax

    from rollout.engine import EngineConfig, SamplingParams
    from rollout.engine.backend import engine_factory

    backend = engine  # the backend's name; `engine` below is the engine itself

    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    config = EngineConfig(max_batch=1, max_seq_len=max_seq_len, load_format="dummy")
    start = time.perf_counter()
    with engine_factory(backend)(model, config, jax.devices()[:devices]) as engine:
        before = leaf_layout(engine.current_params())
        # Warm up under dummy weights with the very request served later, run to full length
        # (ignore_eos), so every shape bucket the real generate can hit is compiled now.
        warmup = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.generate([CHAT_PROMPT], warmup, return_logprobs=False)
        compiled_before = engine.status()["compiled"]
        emit(
            {
                "phase": "engine_ready_dummy",
                "engine": backend,
                "model": str(engine.checkpoint),
                "leaves": len(before),
                "parameters": sum(int(_prod(s)) for s, _, _ in before.values()),
                "bytes": engine.spec.nbytes,
                "version": engine.version,
                "devices": engine.status()["devices"],
                "compiled": compiled_before,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )

        t0 = time.perf_counter()
        staged = engine.stage_checkpoint(1, model)
        engine.commit(1, wait=True)
        after = leaf_layout(engine.current_params())
        changed = sorted(p for p in before if after.get(p) != before[p]) + sorted(set(after) - set(before))
        emit(
            {
                "phase": "weights_swapped",
                "version": engine.serving_version,
                "leaves": len(after),
                "leaves_unchanged": len(after) == len(before),
                "shapes_unchanged": not changed,
                "changed": changed[:8],
                "stage_s": round(staged.seconds, 3),
                "swap_s": round(time.perf_counter() - t0, 3),
            }
        )

        out = engine.generate([CHAT_PROMPT], greedy, return_logprobs=False)[0]
        compiled_after = engine.status()["compiled"]
        emit(
            {
                "phase": "generate_result",
                "text": out.text,
                "token_ids": list(out.token_ids),
                "finish_reason": out.finish_reason,
                "weight_version": out.weight_version,
                "compiled_before": compiled_before,
                "compiled_after": compiled_after,
                "recompiled": compiled_after != compiled_before,
            }
        )
    ok = not changed and len(after) == len(before) and compiled_after == compiled_before and out.weight_version == 1
    return 0 if ok else 1


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer_stub.dummy_then_real",
        description="Engine on dummy weights -> swap real weights from an HF checkpoint -> greedy chat reply.",
    )
    p.add_argument("--model", required=True, help="HF checkpoint directory or repo id")
    p.add_argument("--devices", type=int, default=2, help="devices for the engine (simulated on CPU)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens to generate at most")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--engine", default=FleetConfig.engine, choices=sorted(BACKENDS),
                   help="engine backend (sglang-jax needs Python >= 3.12 and the sglang extra)")
    args = p.parse_args(argv)
    from trainer_stub.clients import configure_devices

    configure_devices(args.devices)
    return run(args.model, devices=args.devices, max_tokens=args.max_tokens, max_seq_len=args.max_seq_len, engine=args.engine)


if __name__ == "__main__":
    sys.exit(main())
