"""The `rollout` command line: demo, generate, bench, serve.

    rollout demo                      GRPO on a toy task against a local Ray fleet (the main job)
    rollout generate MODEL PROMPT...  load a checkpoint, generate, print one JSON line per sample
    rollout bench NAME [...]          run a benchmark of rollout.bench (engine, sync, serve, fanout, paged, backends, agent, levers)
    rollout serve MODEL [...]         OpenAI-compatible HTTP server on a fleet (rollout/server/)

JAX reads XLA_FLAGS once, at import, so this module imports nothing heavy at the top: each
command first sets the simulated device count (on CPU), then imports jax and the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from rollout.engine.backend import BACKENDS
from rollout.engine.config import DTYPES, EngineConfig
from rollout.fleet_config import FleetConfig

# -- demo ---------------------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="RL demo: GRPO on a tiny Qwen3 with live weight sync (local Ray, CPU, < 5 min)",
        description=(
            "Start a local Ray with a rollout fleet, make the built-in tiny Qwen3 checkpoint, and "
            "train it with GRPO to answer in digits (reward = fraction of digit tokens). Each "
            "step generates n samples per prompt, checks the rollout's logprobs against the "
            "trainer's recompute under the same weights, updates, and syncs the new weights. "
            "Shows a progress bar, then a summary table; writes a reward plot (PNG) and a "
            "JSON-lines step log to --out-dir. --engine sglang-jax runs it on sglang-jax workers "
            "(Python >= 3.12): a head_dim-128 tiny model, and no logprob check (it returns no "
            "logprobs on CPU; the demo says so). --moe trains a built-in tiny Qwen3-MoE instead: the "
            "rollout returns each sample's routed experts and the trainer's forward replays them "
            "(routing replay), so the logprob check holds for MoE too. --agent trains multi-turn episodes "
            "(model, calculator tool, model) held as token-exact rollout.Trajectory objects, with the tool's "
            "and the chat template's tokens masked out of the loss."
        ),
    )
    p.add_argument("--model", default=None, help="HF directory or repo id instead of the built-in tiny Qwen3")
    from trainer_stub.train import add_arguments

    add_arguments(p)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from trainer_stub import train

    devices = args.devices_per_worker or train.FleetOptions.devices_per_worker  # the backend may take fewer
    train.configure_devices(devices, "cpu" if args.accelerator == "cpu" else None)
    why = train.engine_unavailable(args.engine)
    if why is not None:
        sys.exit(f"error: --engine {args.engine} cannot run here: {why}")
    if args.backend == "fleet":
        _require_fleet()
    summary = train.run_demo(*train.options_from_args(args))
    return 0 if summary["versions_ok"] else 1


def _require_fleet() -> None:
    import rollout

    if not hasattr(rollout, "init"):
        sys.exit(
            "error: the Ray fleet API (rollout.init / sync_weights / generate) is not available in "
            "this installation (rollout/coordinator/service.py missing?). Run the demo on one in-process "
            "engine instead: rollout demo --backend local"
        )


# -- generate -----------------------------------------------------------------------------------


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate for prompts from a checkpoint; one JSON line per sample",
        description=(
            "Load an HF checkpoint (local directory or repo id), generate for the prompts given "
            "on the command line (or one per line on stdin when none are given), and print one "
            "JSON line per sample: prompt_index, sample_index, text, token_ids, finish_reason, "
            "weight_version (and logprobs with --logprobs)."
        ),
    )
    p.add_argument("model", help="HF checkpoint directory or repo id")
    p.add_argument("prompts", nargs="*", help="prompts (default: read one per line from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message and apply the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--logprobs", action="store_true", help="include each token's logprob")
    p.add_argument("--workers", type=int, default=0, help="Ray workers; 0 = one engine in this process (default)")
    p.add_argument("--devices-per-worker", type=int, default=1, help="devices per engine (simulated on CPU)")
    p.add_argument(
        "--max-batch", type=int, default=None,
        help=f"decode slots per engine (default: the samples asked for, at most {EngineConfig.max_batch})",
    )
    p.add_argument("--max-seq-len", type=int, default=EngineConfig.max_seq_len, help="prompt + new tokens per sample")
    p.add_argument("--dtype", default=EngineConfig.dtype, choices=DTYPES)
    p.add_argument("--accelerator", default="cpu", help="cpu, tpu or gpu")
    p.add_argument("--engine", default=FleetConfig.engine, choices=sorted(BACKENDS),
                   help="engine backend (sglang-jax: Python >= 3.12, the sglang extra; no --logprobs)")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from trainer_stub.clients import configure_devices

    configure_devices(args.devices_per_worker, "cpu" if args.accelerator == "cpu" else None)
    prompts: list = list(args.prompts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        sys.exit("error: no prompts given (pass them as arguments or one per line on stdin)")
    if args.chat:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    # a one-off run needs no more KV slots than samples (KV memory grows with max_batch)
    max_batch = args.max_batch or min(EngineConfig.max_batch, len(prompts) * args.n)

    from rollout.engine.sampling_params import SamplingParams

    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        n=args.n,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    if args.workers > 0:
        _require_fleet()
        import rollout

        rollout.init(
            model=args.model,
            num_workers=args.workers,
            devices_per_worker=args.devices_per_worker,
            dtype=args.dtype,
            max_batch=max_batch,
            max_seq_len=args.max_seq_len,
            accelerator=args.accelerator,
            engine=args.engine,
        )
        try:
            outs = rollout.generate(prompts, sampling=sampling, return_logprobs=args.logprobs)
        finally:
            rollout.shutdown()
    else:
        import jax

        from rollout.engine.backend import engine_factory, generating_engine

        config = EngineConfig(max_batch=max_batch, max_seq_len=args.max_seq_len, dtype=args.dtype)
        engine = generating_engine(engine_factory(args.engine)(args.model, config, jax.devices()[: args.devices_per_worker]))
        try:
            outs = engine.generate(prompts, sampling, return_logprobs=args.logprobs)
        finally:
            engine.shutdown()
    for o in outs:
        record = {
            "prompt_index": o.prompt_index,
            "sample_index": o.sample_index,
            "text": o.text,
            "token_ids": list(o.token_ids),
            "finish_reason": o.finish_reason,
            "weight_version": o.weight_version,
        }
        if args.logprobs:
            record["logprobs"] = list(o.logprobs or ())
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


# -- bench --------------------------------------------------------------------------------------


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from rollout.bench import BENCHMARKS

    p = sub.add_parser(
        "bench",
        help="run a benchmark (engine, sync, serve, fanout, paged, backends, agent, levers)",
        description=(
            "Run the benchmark NAME (a module of rollout.bench) with the remaining arguments, e.g. "
            "`rollout bench engine --batches 1 16`. `rollout bench NAME --help` shows its own options."
        ),
    )
    p.add_argument("name", choices=sorted(BENCHMARKS), help="benchmark to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import importlib

    from rollout.bench import BENCHMARKS

    return int(importlib.import_module(BENCHMARKS[args.name]).main(args.args) or 0)


# -- serve --------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from rollout.server.cli import add_parser  # imports nothing heavy; the server loads on run

    add_parser(sub)


# -- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollout",
        description="RL rollout service with live weight sync, on Ray and JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    # argparse gives `generate`'s prompts nothing once an option follows the model
    # (`rollout generate MODEL --chat "hi"`), so words left over after the options are prompts.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "generate" and not any(word.startswith("-") for word in extra):
        args.prompts = [*args.prompts, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
