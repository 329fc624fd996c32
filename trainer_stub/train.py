"""The RL loop: generate -> reward -> advantages -> logprob check -> update -> sync.

    for step in range(steps):
        outs = rollout.generate(prompts, n=G, temperature=T)    # served by weight version v
        rewards -> group-normalized advantages
        one jitted forward+backward: the loss, and the logprobs of the sampled tokens under the
            params the trainer synced as version v, compared with the rollout's logprobs
        optimizer update -> rollout.sync_weights(new params) -> version v + 1

On-policy, the trainer's recomputed logprobs and the rollout's agree to float32 rounding
(about 1e-6 here), because both use the very same weights. A missed sync, or a sync that did not
take effect, shows at once as a large difference; the loop reports it every step and also checks
that every completion carries the version the trainer last synced. `skip_sync_at` and
`sync_every` skip syncs on purpose, to see the check fail.

The loop talks to the rollout through a small client: `FleetClient` (the Ray fleet, through the
module-level `rollout.init / sync_weights / generate`) or `LocalEngineClient` (one in-process
engine, no Ray). `run_demo` adds a progress bar, JSON-lines logs, a summary table and a plot;
`rollout demo` and `python -m trainer_stub.train` run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

DEMO_STEPS = 40


# -- clients ------------------------------------------------------------------------------------


class RolloutClient(Protocol):
    """The four calls the loop makes; the fleet and a local engine both provide them."""

    def sync_weights(self, params: Any) -> int: ...

    def generate(self, prompts: Sequence[Any], sampling: Any, return_logprobs: bool = True) -> list: ...

    def status(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class FleetOptions:
    """How to start the rollout (fleet or local engine). Per-worker sizes."""

    num_workers: int = 2
    devices_per_worker: int = 2
    max_batch: int = 64  # decode slots per worker; >= prompts x group size avoids queueing
    max_seq_len: int = 128  # prompt + completion tokens per sample
    dtype: str = "float32"  # float32 keeps the logprob check at ~1e-6; bfloat16 would be ~1e-2
    load_format: str = "dummy"  # the loop's first sync brings the real weights anyway
    accelerator: str = "cpu"
    worker_logs: bool = False  # stream the workers' logs to this console (noisy under a progress bar)


class FleetClient:
    """The Ray fleet through the public module-level API.

    If no Ray is running, it starts a local one first (no dashboard; worker logs off unless
    `worker_logs`; on CPU at least one Ray CPU per worker, so `--workers 4` also runs on a
    2-core machine), which `rollout.init` then joins, and stops it at shutdown.
    """

    def __init__(self, model: str | os.PathLike[str], options: FleetOptions = FleetOptions()):
        import ray

        import rollout
        from rollout.local_ray import start_local_ray

        self._rollout = rollout
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            cpus = {"num_cpus": max(os.cpu_count() or 1, options.num_workers)} if options.accelerator == "cpu" else {}
            start_local_ray(include_dashboard=False, log_to_driver=options.worker_logs, **cpus)
        rollout.init(
            model=str(model),
            num_workers=options.num_workers,
            devices_per_worker=options.devices_per_worker,
            load_format=options.load_format,
            dtype=options.dtype,
            max_batch=options.max_batch,
            max_seq_len=options.max_seq_len,
            swap_policy="drain",
            accelerator=options.accelerator,
        )

    def sync_weights(self, params: Any) -> int:
        return self._rollout.sync_weights(params)

    def generate(self, prompts: Sequence[Any], sampling: Any, return_logprobs: bool = True) -> list:
        return self._rollout.generate(prompts, sampling=sampling, return_logprobs=return_logprobs)

    def status(self) -> dict[str, Any]:
        return self._rollout.status()

    def shutdown(self) -> None:
        self._rollout.shutdown()
        if self._owns_ray:
            import ray

            ray.shutdown()


class LocalEngineClient:
    """One in-process Engine on the first `devices_per_worker` local devices (no Ray).

    sync_weights = stage(next version) + commit(wait=True), the protocol the fleet runs per worker.
    """

    def __init__(self, model: str | os.PathLike[str], options: FleetOptions = FleetOptions()):
        import jax

        from rollout.engine import EngineConfig
        from rollout.engine.engine import Engine

        devices = jax.devices()[: options.devices_per_worker]
        if len(devices) < options.devices_per_worker:
            raise RuntimeError(
                f"devices_per_worker={options.devices_per_worker} but this process has "
                f"{len(jax.devices())} device(s); on CPU set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={options.devices_per_worker} before jax is imported"
            )
        config = EngineConfig(
            max_batch=options.max_batch,
            max_seq_len=options.max_seq_len,
            dtype=options.dtype,
            load_format=options.load_format,
        )
        self.engine = Engine(model, config, devices)

    def sync_weights(self, params: Any) -> int:
        version = self.engine.version + 1
        self.engine.stage(version, params)
        return self.engine.commit(version, wait=True)

    def generate(self, prompts: Sequence[Any], sampling: Any, return_logprobs: bool = True) -> list:
        return self.engine.generate(prompts, sampling, return_logprobs=return_logprobs)

    def status(self) -> dict[str, Any]:
        return self.engine.status()

    def shutdown(self) -> None:
        self.engine.shutdown()


def make_client(backend: str, model: str | os.PathLike[str], options: FleetOptions) -> RolloutClient:
    """backend "fleet" (Ray workers) or "local" (one engine in this process)."""
    if backend == "fleet":
        return FleetClient(model, options)
    if backend == "local":
        return LocalEngineClient(model, options)
    raise ValueError(f"backend={backend!r}: expected 'fleet' or 'local'")


# -- the loop -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = DEMO_STEPS
    group_size: int = 8  # samples per prompt (the GRPO group): more = steadier advantages, more tokens
    max_tokens: int = 16  # new tokens per sample
    temperature: float = 1.0  # sampling temperature; the logprob recompute divides by it too
    learning_rate: float = 5e-3  # Adam; measured on the demo model: 1e-2 collapses faster, 3e-3 can stall a group
    seed: int = 0  # step s samples with seed + s: a run is reproducible
    sync_every: int = 1  # sync after every k-th update; 1 = on-policy
    skip_sync_at: tuple[int, ...] = ()  # steps whose sync is skipped on purpose (the check then fails)

    def syncs_after(self, step: int) -> bool:
        return (step + 1) % self.sync_every == 0 and step not in self.skip_sync_at


@dataclasses.dataclass(frozen=True)
class StepRecord:
    step: int
    mean_reward: float
    min_reward: float
    max_reward: float
    weight_version: int  # the version that generated this step's samples (max over samples)
    expected_version: int  # the version the trainer last synced
    version_ok: bool  # every sample came from expected_version
    logprob_diff: float  # mean |trainer - rollout| logprob over completion tokens
    logprob_max_diff: float
    loss: float
    grad_norm: float
    tokens: int  # generated tokens this step
    generate_s: float
    tokens_per_s: float
    train_s: float
    synced: bool
    sync_ms: float  # 0 when the sync was skipped
    new_version: int  # the version serving after this step's sync
    example: str  # one completion's text, for eyeballing

    def to_json(self) -> str:
        return json.dumps({"event": "step", **dataclasses.asdict(self)}, ensure_ascii=False)


@dataclasses.dataclass
class LoopResult:
    records: list[StepRecord]
    params: dict[str, Any]
    initial_sync_ms: float


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

    start = time.perf_counter()
    version = _checked_sync(client, params, previous=-1)
    initial_sync_ms = (time.perf_counter() - start) * 1e3
    optimizer, train_step = grpo.train_step_for(model_def, config.learning_rate, config.temperature)
    opt_state = optimizer.init(params)
    pad_to = 0
    records: list[StepRecord] = []
    for step in range(config.steps):
        sampling = SamplingParams(
            max_tokens=config.max_tokens, temperature=config.temperature, n=config.group_size, seed=config.seed + step
        )
        t0 = time.perf_counter()
        outs = client.generate(list(task.prompts), sampling, return_logprobs=True)
        generate_s = time.perf_counter() - t0

        rewards = np.array([task.reward(o.token_ids) for o in outs], np.float32)
        advantages = grpo.group_advantages(rewards, np.array([o.prompt_index for o in outs]))
        longest = max(len(o.prompt_token_ids) for o in outs) + config.max_tokens
        if longest > pad_to:  # fixed after the first step: one compiled shape
            pad_to = -(-longest // 8) * 8
        batch = grpo.make_batch(outs, advantages, pad_to)

        t0 = time.perf_counter()
        params, opt_state, metrics = train_step(params, opt_state, grpo.batch_arrays(batch))
        # metrics["logprobs"] are under the params before this update: the ones synced as `version`.
        diff_mean, diff_max = grpo.logprob_diff(batch, np.asarray(metrics["logprobs"]))
        jax.block_until_ready(params)
        train_s = time.perf_counter() - t0

        served = {o.weight_version for o in outs}
        expected = version
        synced = config.syncs_after(step)
        sync_ms = 0.0
        if synced:
            t0 = time.perf_counter()
            version = _checked_sync(client, params, previous=version)
            sync_ms = (time.perf_counter() - t0) * 1e3
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
        )
        records.append(record)
        if on_step is not None:
            on_step(record)
    return LoopResult(records, params, initial_sync_ms)


def _checked_sync(client: RolloutClient, params: Any, previous: int) -> int:
    version = client.sync_weights(params)
    if not isinstance(version, int) or version <= previous:
        raise RuntimeError(
            f"sync_weights returned version {version!r} after version {previous}; versions must "
            "increase with every sync (check the rollout service's sync log)"
        )
    return version


# -- the demo: setup, progress, logs, summary, plot ----------------------------------------------

# The demo's built-in model: the tiny Qwen3 of rollout.testing (2 layers, hidden 64, vocab 512).
DEMO_MODEL_SEED = 0


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    model: str | None = None  # HF directory or repo id; None = make the built-in tiny Qwen3
    backend: str = "fleet"
    init: str = "checkpoint"  # "checkpoint": start from the model's weights; "fresh": random init
    out_dir: Path | None = None  # None = a new temporary directory
    log_file: Path | None = None  # None = out_dir / "steps.jsonl"
    progress: bool = True


def builtin_checkpoint(directory: Path, seed: int = DEMO_MODEL_SEED) -> Path:
    """The demo's tiny Qwen3 (rollout.testing.make_tiny_checkpoint), written once into `directory`."""
    from rollout.testing import make_tiny_checkpoint

    if not (directory / "config.json").is_file():
        make_tiny_checkpoint(directory, "Qwen3ForCausalLM", seed=seed)
    return directory


def run_demo(loop: LoopConfig, fleet: FleetOptions, demo: DemoOptions) -> dict[str, Any]:
    """Set up the rollout and the trainer, run the loop with a progress bar, write logs and plot.

    Returns the summary (also written as the last line of the JSON-lines log).
    """
    import tempfile

    wall0 = time.perf_counter()
    out_dir = Path(demo.out_dir) if demo.out_dir else Path(tempfile.mkdtemp(prefix="rollout-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(demo.log_file) if demo.log_file else out_dir / "steps.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    model = demo.model or builtin_checkpoint(out_dir / "tiny-qwen3")
    say = _printer(demo.progress)
    say(f"model: {model}")
    say(
        f"rollout: {fleet.num_workers} worker(s) x {fleet.devices_per_worker} device(s)"
        if demo.backend == "fleet"
        else f"rollout: one local engine on {fleet.devices_per_worker} device(s) (no Ray)"
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
        task = DigitsTask.for_tokenizer(Tokenizer.from_pretrained(directory))
        say(f"task: make the completion digits ({len(task.prompts)} prompts x {loop.group_size} samples, "
            f"{loop.max_tokens} tokens, reward = digit fraction)")
        with open(log_path, "w", encoding="utf-8") as log, _progress(loop.steps, demo.progress) as bar:

            def on_step(r: StepRecord) -> None:
                log.write(r.to_json() + "\n")
                log.flush()
                bar.set_postfix_str(
                    f"reward={r.mean_reward:.2f} v={r.new_version} sync={r.sync_ms:.0f}ms "
                    f"lp_diff={r.logprob_diff:.1e} tok/s={r.tokens_per_s:.0f}",
                    refresh=False,
                )
                bar.update(1)

            result = run_loop(client, model_def, params, task, loop, on_step=on_step)
            status = client.status()
            summary = summarize(result, loop, wall_s=time.perf_counter() - wall0, startup_s=startup_s)
            summary.update(log_file=str(log_path), plot=str(out_dir / "reward.png"), model=str(model))
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


def summarize(result: LoopResult, loop: LoopConfig, *, wall_s: float, startup_s: float) -> dict[str, Any]:
    import numpy as np

    recs = result.records
    k = min(5, len(recs))
    on_policy = [r.logprob_diff for r in recs if r.version_ok and r.step not in _unsynced_steps(loop, len(recs))]
    syncs = [r.sync_ms for r in recs if r.synced]
    return {
        "steps": len(recs),
        "first5_reward": float(np.mean([r.mean_reward for r in recs[:k]])) if recs else float("nan"),
        "last5_reward": float(np.mean([r.mean_reward for r in recs[-k:]])) if recs else float("nan"),
        "max_logprob_diff_on_policy": max(on_policy) if on_policy else float("nan"),
        "max_logprob_diff": max((r.logprob_diff for r in recs), default=float("nan")),
        "versions_ok": all(r.version_ok for r in recs),
        "final_version": recs[-1].new_version if recs else 0,
        "median_sync_ms": float(np.median(syncs)) if syncs else float("nan"),
        "initial_sync_ms": result.initial_sync_ms,
        "mean_tokens_per_s": float(np.mean([r.tokens_per_s for r in recs])) if recs else float("nan"),
        "startup_s": startup_s,
        "wall_s": wall_s,
    }


def _unsynced_steps(loop: LoopConfig, steps: int) -> set[int]:
    """Steps whose samples came from weights older than the trainer's (a sync was skipped before)."""
    return {s + 1 for s in range(steps) if not loop.syncs_after(s)}


def summary_table(records: Sequence[StepRecord], summary: dict[str, Any], rows: int = 10) -> str:
    """A fixed-width table of about `rows` evenly spaced steps, then the totals."""
    if not records:
        return "no steps were run"
    picks = sorted({round(i * (len(records) - 1) / max(rows - 1, 1)) for i in range(rows)})
    lines = [
        f"{'step':>5} {'reward':>7} {'version':>8} {'sync ms':>8} {'logprob diff':>13} {'tok/s':>8}  example",
        "-" * 78,
    ]
    for i in picks:
        r = records[i]
        example = r.example.replace("\n", " ")[:22]
        lines.append(
            f"{r.step:>5} {r.mean_reward:>7.3f} {r.weight_version:>8} {r.sync_ms:>8.1f} "
            f"{r.logprob_diff:>13.2e} {r.tokens_per_s:>8.0f}  {example!r}"
        )
    lines.append("-" * 78)
    lines += [
        f"mean reward, first 5 steps      {summary['first5_reward']:.3f}",
        f"mean reward, last 5 steps       {summary['last5_reward']:.3f}",
        f"max logprob diff (on-policy)    {summary['max_logprob_diff_on_policy']:.2e}",
        f"every sample from synced weights {summary['versions_ok']}",
        f"weight version at the end       {summary['final_version']}",
        f"median sync                     {summary['median_sync_ms']:.1f} ms",
        f"startup (rollout)               {summary['startup_s']:.1f} s",
        f"wall time                       {summary['wall_s']:.1f} s",
    ]
    return "\n".join(lines)


def plot_rewards(records: Sequence[StepRecord], path: Path) -> Path:
    """Mean reward (min-max band) and the logprob difference per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    top.fill_between(steps, [r.min_reward for r in records], [r.max_reward for r in records], alpha=0.2, label="min-max")
    top.plot(steps, [r.mean_reward for r in records], marker=".", label="mean reward")
    top.set_ylabel("reward (digit fraction)")
    top.set_ylim(-0.02, 1.02)
    top.legend(loc="lower right")
    top.set_title("rollout demo: GRPO on a tiny Qwen3")
    bottom.semilogy(steps, [max(r.logprob_diff, 1e-12) for r in records], marker=".", color="tab:red")
    bottom.axhline(1e-4, color="gray", linestyle="--", linewidth=1, label="on-policy bound 1e-4")
    bottom.legend(loc="upper right")
    bottom.set_ylabel("|logprob diff|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _NoBar:
    def __enter__(self) -> "_NoBar":  # noqa: PYI034, UP037
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="RL steps", unit="step", dynamic_ncols=True)


def _printer(enabled: bool) -> Callable[[str], None]:
    return (lambda text: print(text, flush=True)) if enabled else (lambda text: None)


def status_line(status: dict[str, Any]) -> str:
    """One line per engine of `status()` (the fleet's or a local engine's): the essentials."""
    keys = ("version", "swaps", "compiled", "tokens_generated", "restarts")
    engines = status.get("workers", [status])
    parts = []
    for i, w in enumerate(engines):
        fields = " ".join(f"{k}={w[k]}" for k in keys if k in w)
        parts.append(f"worker {w.get('index', i)}: {fields}" + ("" if w.get("alive", True) else " (down)"))
    head = f"fleet version {status['version']}, {len(status.get('syncs', []))} recent syncs; " if "workers" in status else ""
    return head + "; ".join(parts)


# -- command line -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags shared by `rollout demo` and `python -m trainer_stub.train`."""
    d, f = LoopConfig(), FleetOptions()
    p.add_argument("--steps", type=int, default=d.steps, help="RL steps (default %(default)s)")
    p.add_argument("--workers", type=int, default=f.num_workers, help="rollout workers (Ray actors)")
    p.add_argument("--devices-per-worker", type=int, default=f.devices_per_worker, help="devices per worker (simulated on CPU)")
    p.add_argument("--group-size", type=int, default=d.group_size, help="samples per prompt (GRPO group)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed of step 0 (step s uses seed + s)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the checkpoint, plot and log go (default: a new temp dir)")
    p.add_argument("--log-file", type=Path, default=None, help="JSON-lines step log (default: OUT_DIR/steps.jsonl)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="new tokens per sample")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
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
        "--init", choices=("checkpoint", "fresh"), default="checkpoint",
        help="the trainer starts from the checkpoint's weights or from a random init",
    )
    p.add_argument("--dtype", default=f.dtype, choices=("float32", "bfloat16"))
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
        learning_rate=args.learning_rate,
        seed=args.seed,
        sync_every=args.sync_every,
        skip_sync_at=tuple(args.skip_sync_at),
    )
    fleet = FleetOptions(
        num_workers=args.workers,
        devices_per_worker=args.devices_per_worker,
        max_batch=args.max_batch,
        dtype=args.dtype,
        accelerator=args.accelerator,
        worker_logs=args.worker_logs,
    )
    demo = DemoOptions(
        model=getattr(args, "model", None),
        backend=args.backend,
        init=args.init,
        out_dir=args.out_dir,
        log_file=args.log_file,
        progress=not args.quiet,
    )
    return loop, fleet, demo


def configure_devices(devices: int, platform: str | None = None) -> None:
    """Let this process simulate `devices` CPU devices (harmless on TPU/GPU hosts) and, if given,
    pin the JAX platform. Must run before jax is imported; later it does nothing."""
    if "jax" in sys.modules:
        return  # too late to change; LocalEngineClient will say so if there are too few
    if platform:
        os.environ.setdefault("JAX_PLATFORMS", platform)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer_stub.train",
        description="GRPO on a toy digits task against a rollout fleet (or a local engine).",
    )
    p.add_argument("--model", default=None, help="HF directory or repo id (default: the built-in tiny Qwen3)")
    add_arguments(p)
    args = p.parse_args(argv)
    configure_devices(args.devices_per_worker, "cpu" if args.accelerator == "cpu" else None)
    summary = run_demo(*options_from_args(args))
    return 0 if summary["versions_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
