"""The RL loop: generate -> reward -> advantages -> logprob check -> update -> sync.

    for step in range(steps):
        outs = rollout.generate(prompts, n=G, temperature=T)    # served by weight version v
        rewards -> group-normalized advantages
        one jitted forward+backward: the loss, and the logprobs of the sampled tokens under the
            params the trainer synced as version v, compared with the rollout's logprobs
        optimizer update -> rollout.sync_weights(new params) -> version v + 1

On-policy, the trainer's recomputed logprobs and the rollout's agree to float32 rounding
(about 1e-6 here), because both use the very same weights. With a mixture-of-experts model the
loop asks for each sample's routed experts and the trainer's forward replays them (routing
replay, trainer_stub/grpo.py); each step also records the difference without replay. A missed sync, or a sync that did not
take effect, shows at once as a large difference; the loop reports it every step and also checks
that every completion carries the version the trainer last synced. `skip_sync_at` and
`sync_every` skip syncs on purpose, to see the check fail. Where the engine backend declares
that it cannot return logprobs (its EngineCapabilities; sglang-jax 0.0.2 on CPU), the loop asks
for none and says the logprob check is unavailable, with the backend's reason; the version check
still runs every step.

The loop talks to the rollout through a small client (trainer_stub/clients.py): the Ray fleet
or one in-process engine. `run_demo` adds a progress bar, JSON-lines logs, a summary table and a
plot (trainer_stub/report.py); `rollout demo` and `python -m trainer_stub.train` run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollout.engine.backend import BACKENDS, FeatureUnavailableError
from trainer_stub.agent import AGENT_MAX_SEQ_LEN
from trainer_stub.clients import FleetOptions, RolloutClient, configure_devices, make_client
from trainer_stub.records import LoopConfig, LoopResult, StepRecord
from trainer_stub.report import plot_rewards, printer, progress_bar, status_line, summarize, summary_table

LORA_LEARNING_RATE = 2e-2  # --lora's default: the factors start at zero and want larger steps
DEFAULT_TIS_CAP = 2.0  # --quantization's TIS cap unless --tis-cap says otherwise (verl's default)


# -- the loop -----------------------------------------------------------------------------------


def logprob_check_unavailable(client: RolloutClient) -> str | None:
    """Why the on-policy logprob check cannot run on `client`'s backend (its declared reason), or
    None when the backend returns logprobs."""
    try:
        client.capabilities.require("logprobs")
    except FeatureUnavailableError as err:
        return str(err)
    return None


def run_loop(
    client: RolloutClient,
    model_def: Any,
    params: dict[str, Any],
    task: Any,
    config: LoopConfig = LoopConfig(),
    *,
    on_step: Callable[[StepRecord], None] | None = None,
) -> LoopResult:
    """Run `config.steps` RL steps against `client`; return per-step records and final params.

    The loop first syncs `params` so the rollout serves exactly the trainer's weights.
    """
    import jax
    import numpy as np

    from rollout.engine.sampling_params import SamplingParams
    from trainer_stub import grpo

    unavailable = logprob_check_unavailable(client)
    replay = model_def.config.is_moe and config.replay_routes
    start = time.perf_counter()
    version = _checked_sync(client, params, previous=-1)  # with --lora: the base the adapters merge onto
    initial_sync_ms = (time.perf_counter() - start) * 1e3
    if config.tis_cap is not None and (unavailable is not None or config.lora_rank):
        raise ValueError("tis_cap needs the rollout's logprobs and full-weight training (not LoRA)")
    optimizer, train_step = grpo.train_step_for(
        model_def, config.learning_rate, config.temperature, batch_invariant=config.batch_invariant,
        tis_cap=config.tis_cap,
    )
    lora = None
    if config.lora_rank:
        from trainer_stub.lora import LoraTraining

        lora = LoraTraining.create(model_def, params, config.lora_rank)
        factors = grpo.on_trainer_device(lora.init(config.seed))
        lora_step = lora.train_step(optimizer, config.temperature)
        opt_state = grpo.on_trainer_device(optimizer.init(factors))
    else:
        opt_state = grpo.on_trainer_device(optimizer.init(params))
    full_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(params))
    pad_to = 0
    records: list[StepRecord] = []
    for step in range(config.steps):
        sampling = SamplingParams(
            max_tokens=config.max_tokens, temperature=config.temperature, n=config.group_size, seed=config.seed + step,
            return_routed_experts=replay,
        )
        t0 = time.perf_counter()
        outs = client.generate(list(task.prompts), sampling, return_logprobs=unavailable is None)
        generate_s = time.perf_counter() - t0

        rewards = np.array([task.reward(o.token_ids) for o in outs], np.float32)
        advantages = grpo.group_advantages(rewards, np.array([o.prompt_index for o in outs]))
        longest = max(len(o.prompt_token_ids) for o in outs) + config.max_tokens
        if longest > pad_to:  # fixed after the first step: one compiled shape
            pad_to = -(-longest // 8) * 8
        batch = grpo.make_batch(outs, advantages, pad_to)
        unreplayed: tuple[float | None, float | None] = (None, None)
        if model_def.config.is_moe and unavailable is None and lora is None:  # before params move on
            unreplayed = grpo.logprob_diff(batch, grpo.unreplayed_logprobs(model_def, params, batch, config.temperature))

        t0 = time.perf_counter()
        if lora is None:
            params, opt_state, metrics = train_step(
                params, opt_state, grpo.batch_arrays(batch, rollout_logprobs=config.tis_cap is not None)
            )
        else:
            factors, opt_state, metrics = lora_step(factors, opt_state, grpo.batch_arrays(batch), lora.base)
        # metrics["logprobs"] are under the params before this update: the ones synced as `version`.
        diff_mean: float | None = None
        diff_max: float | None = None
        if unavailable is None:
            diff_mean, diff_max = grpo.logprob_diff(batch, np.asarray(metrics["logprobs"]))
        jax.block_until_ready(params)
        train_s = time.perf_counter() - t0

        served = {o.weight_version for o in outs}
        expected = version
        synced = config.syncs_after(step)
        sync_ms = 0.0
        sync_bytes = 0
        if synced:
            t0 = time.perf_counter()
            update = params if lora is None else lora.adapter(factors)
            version = _checked_sync(client, update, previous=version)
            sync_ms = (time.perf_counter() - t0) * 1e3
            sync_bytes = full_bytes if lora is None else lora.nbytes(factors)
        tokens = sum(len(o.token_ids) for o in outs)
        record = StepRecord(
            step=step,
            mean_reward=float(rewards.mean()),
            min_reward=float(rewards.min()),
            max_reward=float(rewards.max()),
            weight_version=max(served),
            expected_version=expected,
            version_ok=served == {expected},
            logprob_diff=diff_mean,
            logprob_max_diff=diff_max,
            loss=float(metrics["loss"]),
            grad_norm=float(metrics["grad_norm"]),
            tokens=tokens,
            generate_s=generate_s,
            tokens_per_s=tokens / max(generate_s, 1e-9),
            train_s=train_s,
            synced=synced,
            sync_ms=sync_ms,
            new_version=version,
            example=outs[0].text,
            sync_bytes=sync_bytes,
            logprob_diff_unreplayed=unreplayed[0],
            logprob_max_diff_unreplayed=unreplayed[1],
        )
        records.append(record)
        if on_step is not None:
            on_step(record)
    return LoopResult(records, params if lora is None else lora.merged(factors), initial_sync_ms, unavailable)


def _checked_sync(client: RolloutClient, params: Any, previous: int) -> int:
    version = client.sync_weights(params)
    if not isinstance(version, int) or version <= previous:
        raise RuntimeError(
            f"sync_weights returned version {version!r} after version {previous}; versions must "
            "increase with every sync (check the rollout service's sync log)"
        )
    return version


# -- the demo: setup, progress, logs, summary, plot ----------------------------------------------

# The demo's built-in model: the tiny Qwen3 of rollout.testing (2 layers, hidden 64, vocab 512,
# head_dim 32), its head_dim rounded up to what the engine backend can hold (sglang-jax: 128).
DEMO_MODEL_SEED = 0
TINY_HEAD_DIM = 32


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    model: str | None = None  # HF directory or repo id; None = make the built-in tiny Qwen3
    moe: bool = False  # the built-in model is the tiny Qwen3-MoE (rollout.testing.TINY_QWEN3_MOE)
    agent: bool = False  # the multi-turn calculator environment (trainer_stub/agent.py) instead of the digits task
    backend: str = "fleet"  # "fleet" (Ray workers) or "local" (one engine in this process)
    init: str = "checkpoint"  # "checkpoint": start from the model's weights; "fresh": random init
    out_dir: Path | None = None  # None = a new temporary directory
    log_file: Path | None = None  # None = out_dir / "steps.jsonl"
    progress: bool = True


def builtin_checkpoint(
    directory: Path, seed: int = DEMO_MODEL_SEED, head_dim: int = TINY_HEAD_DIM, *, moe: bool = False
) -> Path:
    """The demo's tiny Qwen3, or with `moe` its tiny Qwen3-MoE (rollout.testing.make_tiny_checkpoint),
    written once into `directory`."""
    from rollout.testing import make_tiny_checkpoint

    if not (directory / "config.json").is_file():
        sizes = {} if head_dim == TINY_HEAD_DIM else {"head_dim": head_dim}
        make_tiny_checkpoint(directory, "Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM", seed=seed, **sizes)
    return directory


def engine_unavailable(engine: str) -> str | None:
    """Why `engine`'s backend cannot run in this Python (its module's `check_available()`; none
    declared: it can), or None. The demo's workers run this Python (a local Ray), so this is
    checked before anything starts."""
    check = getattr(_backend_module(engine), "check_available", None)
    try:
        if check is not None:
            check()
    except (RuntimeError, ImportError) as err:
        return str(err)
    return None


def _backend_module(engine: str) -> Any:
    """The module of `engine`'s factory, where a backend declares what the demo must know before it
    starts (HEAD_DIM_MULTIPLE, DEMO_DEVICES_PER_WORKER, check_available). Imports jax for the
    native engine: call it after configure_devices."""
    import importlib

    return importlib.import_module(BACKENDS[engine].split(":")[0])


def head_dim_for(engine: str) -> int:
    """The built-in model's head_dim on `engine`'s backend: the tiny model's 32, rounded up to the
    multiple the backend's module declares it can hold (`HEAD_DIM_MULTIPLE`; none declared: any)."""
    multiple = int(getattr(_backend_module(engine), "HEAD_DIM_MULTIPLE", 1))
    return -(-TINY_HEAD_DIM // multiple) * multiple


def devices_per_worker_for(engine: str) -> int:
    """The demo's devices per worker on `engine`'s backend when not given: its module's
    DEMO_DEVICES_PER_WORKER, else FleetOptions' (2)."""
    return int(getattr(_backend_module(engine), "DEMO_DEVICES_PER_WORKER", FleetOptions.devices_per_worker))


def builtin_model_dir(out_dir: Path, head_dim: int, moe: bool = False) -> Path:
    name = "tiny-qwen3-moe" if moe else "tiny-qwen3"
    return out_dir / (name if head_dim == TINY_HEAD_DIM else f"{name}-hd{head_dim}")


def run_demo(loop: LoopConfig, fleet: FleetOptions, demo: DemoOptions) -> dict[str, Any]:
    """Set up the rollout and the trainer, run the loop with a progress bar, write logs and plot.

    Returns the summary (also written as the last line of the JSON-lines log).
    """
    import tempfile

    why = engine_unavailable(fleet.engine)
    if why is not None:
        raise RuntimeError(f"the demo cannot run with engine={fleet.engine!r} here: {why}")
    wall0 = time.perf_counter()
    out_dir = Path(demo.out_dir) if demo.out_dir else Path(tempfile.mkdtemp(prefix="rollout-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(demo.log_file) if demo.log_file else out_dir / "steps.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if demo.model:
        model: str | Path = demo.model
    else:
        head_dim = head_dim_for(fleet.engine)
        model = builtin_checkpoint(builtin_model_dir(out_dir, head_dim, demo.moe), head_dim=head_dim, moe=demo.moe)
    say = printer(demo.progress)
    say(f"model: {model}")
    say(
        f"rollout: {fleet.num_workers} worker(s) x {fleet.devices_per_worker} device(s), engine {fleet.engine}"
        if demo.backend == "fleet"
        else f"rollout: one local {fleet.engine} engine on {fleet.devices_per_worker} device(s) (no Ray)"
    )

    from rollout.tokenizer import Tokenizer
    from trainer_stub import model_io
    from trainer_stub.tasks import DigitsTask

    t0 = time.perf_counter()
    client = make_client(demo.backend, model, fleet)
    startup_s = time.perf_counter() - t0
    try:
        if demo.init == "fresh":
            model_def, params = model_io.init_params(model, seed=loop.seed, dtype=fleet.dtype)
        else:
            model_def, params = model_io.load_params(model, dtype=fleet.dtype)
        _, directory = model_io.model_def_for(model, fleet.dtype)
        task: Any = DigitsTask.for_tokenizer(Tokenizer.from_pretrained(directory))
        if model_def.config.is_moe:
            how = "uses the rollout's routed experts" if loop.replay_routes else "routes with its own router"
            say(f"routing replay: {'on' if loop.replay_routes else 'OFF'} (the trainer's forward {how}; "
                "each step also records the logprob difference without replay)")
        if demo.agent:
            from trainer_stub.agent import CalculatorEnv

            task = CalculatorEnv.for_tokenizer(Tokenizer.from_pretrained(directory))
            say(f"task: agent episodes (model, calculator tool, model; {len(task.prompts)} questions x "
                f"{loop.group_size} episodes, {loop.max_tokens} tokens a turn, reward = digit fraction of the "
                "model's tokens; tool and template tokens masked out of the loss)")
        else:
            say(f"task: make the completion digits ({len(task.prompts)} prompts x {loop.group_size} samples, "
                f"{loop.max_tokens} tokens, reward = digit fraction)")
        if fleet.quantization:
            say(f"rollout weights: {fleet.quantization} (re-quantized at every sync); the trainer keeps "
                f"{fleet.dtype} and corrects with truncated importance sampling (cap {loop.tis_cap}); the logprob "
                "diff column is the quantization's mismatch, not an on-policy check")
        unavailable = logprob_check_unavailable(client)
        check = logprob_check_record(fleet.engine, unavailable)
        if unavailable is not None:
            say(f"on-policy logprob check: UNAVAILABLE on engine {fleet.engine!r}: {unavailable}. "
                "Only the version check (every sample from the weights synced last) runs.")
        with open(log_path, "w", encoding="utf-8") as log, progress_bar(loop.steps, demo.progress) as bar:
            log.write(json.dumps(check, ensure_ascii=False) + "\n")

            def on_step(r: StepRecord) -> None:
                log.write(r.to_json() + "\n")
                log.flush()
                lp = "n/a" if r.logprob_diff is None else f"{r.logprob_diff:.1e}"
                bar.set_postfix_str(
                    f"reward={r.mean_reward:.2f} v={r.new_version} sync={r.sync_ms:.0f}ms "
                    f"lp_diff={lp} tok/s={r.tokens_per_s:.0f}",
                    refresh=False,
                )
                bar.update(1)

            if demo.agent:
                from trainer_stub.agent import run_agent_loop

                result = run_agent_loop(client, model_def, params, task, loop, sync=_checked_sync,
                                        unavailable=unavailable, on_step=on_step)
            else:
                result = run_loop(client, model_def, params, task, loop, on_step=on_step)
            status = client.status()
            summary = summarize(result, loop, wall_s=time.perf_counter() - wall0, startup_s=startup_s)
            summary.update(log_file=str(log_path), plot=str(out_dir / "reward.png"), model=str(model), engine=fleet.engine)
            log.write(json.dumps({"event": "summary", **summary}) + "\n")
    finally:
        client.shutdown()
    plot_path = plot_rewards(result.records, out_dir / "reward.png")
    summary["wall_s"] = time.perf_counter() - wall0
    say(summary_table(result.records, summary))
    say(f"rollout status at the end: {status_line(status)}")
    say(f"plot: {plot_path}")
    say(f"step log (JSON lines): {log_path}")
    return summary


def logprob_check_record(engine: str, unavailable: str | None) -> dict[str, Any]:
    """The JSON-lines log's first record: whether the on-policy logprob check runs, and if not why."""
    return {"event": "logprob_check", "engine": engine, "available": unavailable is None, "reason": unavailable}


# -- command line -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags shared by `rollout demo` and `python -m trainer_stub.train`."""
    d, f = LoopConfig(), FleetOptions()
    p.add_argument("--steps", type=int, default=d.steps, help="RL steps (default %(default)s)")
    p.add_argument("--workers", type=int, default=f.num_workers, help="rollout workers (Ray actors)")
    p.add_argument(
        "--devices-per-worker", type=int, default=None,
        help=f"devices per worker (simulated on CPU; default {f.devices_per_worker}, 1 with --engine sglang-jax)",
    )
    p.add_argument("--group-size", type=int, default=d.group_size, help="samples per prompt (GRPO group)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed of step 0 (step s uses seed + s)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the checkpoint, plot and log go (default: a new temp dir)")
    p.add_argument("--log-file", type=Path, default=None, help="JSON-lines step log (default: OUT_DIR/steps.jsonl)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="new tokens per sample")
    p.add_argument("--learning-rate", type=float, default=None,
                   help=f"Adam learning rate (default {d.learning_rate}; {LORA_LEARNING_RATE} with --lora)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train a rank-RANK LoRA adapter on every linear layer and sync only the adapter (0: full)")
    p.add_argument("--moe", action="store_true",
                   help="the built-in model is a tiny Qwen3-MoE (8 experts, top-2): the rollout returns each "
                   "sample's routed experts and the trainer replays them (routing replay)")
    p.add_argument("--agent", action="store_true",
                   help="multi-turn agent episodes with a calculator tool, held as token-exact rollout.Trajectory "
                   "objects; the loss mask keeps tool and template tokens out of the loss (trainer_stub/agent.py)")
    p.add_argument("--no-route-replay", action="store_true",
                   help="MoE models: the trainer routes with its own router instead of replaying the rollout's routes")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--sync-every", type=int, default=d.sync_every, help="sync after every k-th update (1 = on-policy)")
    p.add_argument(
        "--skip-sync-at", type=int, nargs="*", default=[], metavar="STEP",
        help="skip the sync after these steps (to see the logprob check fail)",
    )
    p.add_argument(
        "--backend", choices=("fleet", "local"), default="fleet", help="Ray fleet, or one engine in this process"
    )
    p.add_argument(
        "--engine", default=f.engine, choices=sorted(BACKENDS),
        help="engine backend of the rollout (sglang-jax: Python >= 3.12 and the sglang extra; it returns no "
        "logprobs on CPU, so the on-policy logprob check is unavailable there, and the built-in model gets "
        "head_dim 128)",
    )
    p.add_argument(
        "--init", choices=("checkpoint", "fresh"), default="checkpoint",
        help="the trainer starts from the checkpoint's weights or from a random init",
    )
    p.add_argument(
        "--batch-invariant", action="store_true",
        help="the rollout runs in batch-invariant mode and the trainer recomputes logprobs with "
        "rollout.models.token_logprobs: the logprob difference is exactly 0 (one device per worker, as the trainer)",
    )
    p.add_argument("--dtype", default=f.dtype, choices=("float32", "bfloat16"))  # what the trainer trains in
    p.add_argument("--quantization", default=None, choices=("int8",),
                   help="the rollout engines serve int8 weights, re-quantized at every sync; the trainer keeps "
                        f"full precision and corrects with TIS (--tis-cap, default {DEFAULT_TIS_CAP} then)")
    p.add_argument("--tis-cap", type=float, default=None,
                   help="truncated importance sampling: weight tokens by min(pi_trainer / pi_rollout, cap)")
    p.add_argument("--max-batch", type=int, default=f.max_batch, help="decode slots per worker")
    p.add_argument("--accelerator", default=f.accelerator, help="cpu, tpu or gpu (passed to rollout.init)")
    p.add_argument("--worker-logs", action="store_true", help="stream the Ray workers' logs to the console")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table (the JSON log is still written)")


def options_from_args(args: argparse.Namespace) -> tuple[LoopConfig, FleetOptions, DemoOptions]:
    loop = LoopConfig(
        steps=args.steps,
        group_size=args.group_size,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        learning_rate=args.learning_rate or (LORA_LEARNING_RATE if args.lora else LoopConfig.learning_rate),
        lora_rank=args.lora,
        seed=args.seed,
        sync_every=args.sync_every,
        skip_sync_at=tuple(args.skip_sync_at),
        replay_routes=not args.no_route_replay,
        batch_invariant=args.batch_invariant,
        tis_cap=(args.tis_cap or DEFAULT_TIS_CAP) if args.quantization else args.tis_cap,
    )
    fleet = FleetOptions(
        num_workers=args.workers,
        # batch-invariant numbers hold for one device count: the trainer's one device
        devices_per_worker=args.devices_per_worker or (1 if args.batch_invariant else devices_per_worker_for(args.engine)),
        max_batch=args.max_batch,
        max_seq_len=AGENT_MAX_SEQ_LEN if args.agent else FleetOptions.max_seq_len,
        dtype=args.dtype,
        accelerator=args.accelerator,
        worker_logs=args.worker_logs,
        engine=args.engine,
        batch_invariant=args.batch_invariant,
        quantization=args.quantization,
    )
    demo = DemoOptions(
        model=getattr(args, "model", None),
        moe=args.moe,
        agent=args.agent,
        backend=args.backend,
        init=args.init,
        out_dir=args.out_dir,
        log_file=args.log_file,
        progress=not args.quiet,
    )
    return loop, fleet, demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer_stub.train",
        description="GRPO on a toy digits task against a rollout fleet (or a local engine).",
    )
    p.add_argument("--model", default=None, help="HF directory or repo id (default: the built-in tiny Qwen3)")
    add_arguments(p)
    args = p.parse_args(argv)
    configure_devices(args.devices_per_worker or FleetOptions.devices_per_worker, "cpu" if args.accelerator == "cpu" else None)
    why = engine_unavailable(args.engine)
    if why is not None:
        sys.exit(f"error: --engine {args.engine} cannot run here: {why}")
    summary = run_demo(*options_from_args(args))
    return 0 if summary["versions_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
