"""Example job for a Ray cluster of Cloud TPU VMs started from cluster/tpu.yaml.

It starts a rollout fleet (one worker per TPU host, all of that host's chips), loads real
weights into it with `rollout.sync_weights`, generates a few GRPO-style batches (n samples per
prompt), prints throughput, group advantages of a toy reward and `rollout.status()`, then shuts
the fleet down. With `--trainer` it afterwards hands over to `trainer_stub.train` if installed.

Run it from your machine after `ray up cluster/tpu.yaml`:

    ray submit cluster/tpu.yaml cluster/train_on_tpu.py
    ray submit cluster/tpu.yaml cluster/train_on_tpu.py -- --batches 5 --max-tokens 512

or through the Jobs API (`ray dashboard cluster/tpu.yaml` keeps the tunnel open):

    ray job submit --address http://127.0.0.1:8265 --working-dir cluster -- \
        python train_on_tpu.py

The TPU hosts are created on demand: the first run waits several minutes for them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Worker layout. tests/test_cluster_config.py checks these against cluster/tpu.yaml.
TPU_NODE_TYPE = "tpu_v4_8"  # node type in cluster/tpu.yaml that the workers land on
NUM_WORKERS = 2  # rollout workers = TPU hosts; <= max_workers of TPU_NODE_TYPE
DEVICES_PER_WORKER = 4  # all chips of one host: v4-8 -> 4, v5litepod-8 -> 8

MODEL = "Qwen/Qwen3-0.6B"  # public HF repo, no token needed; the head downloads it
DTYPE = "bfloat16"
MAX_BATCH = 64  # decode slots per worker
MAX_SEQ_LEN = 2048  # prompt + generated tokens per sequence

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about tensor processing units.",
    "What is 17 * 23? Think step by step.",
    "Give three tips for writing clear error messages.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-workers", type=int, default=NUM_WORKERS)
    p.add_argument(
        "--devices-per-worker",
        type=int,
        default=DEVICES_PER_WORKER,
        help="TPU chips per worker; must equal the chips of one host of the enabled TPU node type",
    )
    p.add_argument("--model", default=MODEL)
    p.add_argument("--batches", type=int, default=3, help="generate() calls to make")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (GRPO group size)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--wait-minutes",
        type=float,
        default=30.0,
        help="how long to wait for the autoscaler to bring up the TPU hosts",
    )
    p.add_argument(
        "--trainer",
        action="store_true",
        help="afterwards run trainer_stub.train (if importable) with --trainer-args",
    )
    p.add_argument(
        "--trainer-args", default="", help="arguments for trainer_stub.train, as one string"
    )
    return p.parse_args(argv)


def wait_for_tpu_hosts(num_workers: int, devices_per_worker: int, timeout_s: float) -> None:
    """Ask the autoscaler for the TPU hosts up front and wait until Ray sees their chips.

    rollout.init would trigger the same scale-up through its pending actors; asking first gives
    a progress report and a clear error instead of a silent wait.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    needed = num_workers * devices_per_worker
    request_resources(bundles=[{"TPU": devices_per_worker}] * num_workers)
    start = time.monotonic()
    last = None
    while True:
        have = int(ray.cluster_resources().get("TPU", 0))
        if have != last:
            print(f"[{time.monotonic() - start:5.0f}s] TPU chips in the cluster: {have}/{needed}")
            last = have
        if have >= needed:
            break
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(
                f"only {have} of {needed} TPU chips joined after {timeout_s / 60:.0f} min. Check "
                "`ray status` and the autoscaler log (`ray exec cluster/tpu.yaml 'tail -n 100 "
                "/tmp/ray/session_latest/logs/monitor.*'`): usual causes are no TPU quota or "
                "capacity in the zone, a zone without this TPU generation, or max_workers too low."
            )
        time.sleep(10)

    per_host = {
        n["NodeManagerAddress"]: int(n["Resources"].get("TPU", 0))
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("TPU")
    }
    mismatched = {ip: c for ip, c in per_host.items() if c != devices_per_worker}
    if mismatched:
        print(
            f"warning: hosts with a TPU count other than devices_per_worker={devices_per_worker}: "
            f"{mismatched}. Each worker should own one whole host; pass --devices-per-worker "
            "equal to the chips per host of the TPU node type you enabled."
        )


def toy_reward(text: str) -> float:
    """Stand-in for a real reward: prefers answers near 40 words."""
    return -abs(len(text.split()) - 40) / 40.0


def print_batch_summary(outs, seconds: float) -> None:
    tokens = sum(len(o.token_ids) for o in outs)
    versions = sorted({o.weight_version for o in outs})
    finish = {}
    for o in outs:
        finish[o.finish_reason] = finish.get(o.finish_reason, 0) + 1
    print(
        f"  {len(outs)} completions, {tokens} tokens in {seconds:.1f}s "
        f"({tokens / max(seconds, 1e-9):.0f} tok/s), weight versions {versions}, finish {finish}"
    )
    # GRPO: the advantage of a sample is its reward relative to the other samples of its prompt.
    groups: dict[int, list] = {}
    for o in outs:
        groups.setdefault(o.prompt_index, []).append(o)
    for prompt_index, group in sorted(groups.items()):
        rewards = [toy_reward(o.text) for o in group]
        mean = statistics.fmean(rewards)
        std = statistics.pstdev(rewards) or 1.0
        advantages = [(r - mean) / std for r in rewards]
        best = group[max(range(len(group)), key=advantages.__getitem__)]
        logprob = sum(best.logprobs) if best.logprobs else float("nan")
        print(
            f"  prompt {prompt_index}: mean reward {mean:+.2f}, best sample {best.sample_index} "
            f"(adv {max(advantages):+.2f}, logprob {logprob:.1f}): {best.text[:60]!r}"
        )


def run_rollouts(args: argparse.Namespace) -> None:
    import rollout

    print(
        f"rollout.init: {args.num_workers} workers x {args.devices_per_worker} TPU chips, "
        f"model {args.model}"
    )
    rollout.init(
        model=args.model,
        num_workers=args.num_workers,
        devices_per_worker=args.devices_per_worker,
        load_format="dummy",  # shapes only; the real weights arrive by sync_weights below
        dtype=DTYPE,
        max_batch=MAX_BATCH,
        max_seq_len=MAX_SEQ_LEN,
        accelerator="tpu",
    )
    try:
        t0 = time.perf_counter()
        version = rollout.sync_weights(args.model)  # a trainer passes its params pytree here
        seconds = time.perf_counter() - t0
        print(f"sync_weights({args.model!r}) -> version {version} in {seconds:.1f}s")

        for step in range(args.batches):
            sampling = rollout.SamplingParams(
                max_tokens=args.max_tokens, temperature=args.temperature, n=args.samples, seed=step
            )
            t0 = time.perf_counter()
            outs = rollout.generate(PROMPTS, sampling=sampling, return_logprobs=True)
            print(f"batch {step}:")
            print_batch_summary(outs, time.perf_counter() - t0)
            # A trainer would take a policy-gradient step on `outs` here and then call
            # rollout.sync_weights(new_params); see trainer_stub for that loop.

        print("rollout.status():")
        for key, value in rollout.status().items():
            print(f"  {key}: {value}")
    finally:
        rollout.shutdown()


def run_trainer_stub(trainer_args: str) -> None:
    """Hand over to trainer_stub.train's command line, if the package has it."""
    try:
        from trainer_stub import train
    except ImportError as e:
        print(f"trainer_stub.train is not importable ({e}); skipping the trainer section.")
        return
    main = getattr(train, "main", None)
    if main is None:
        print("trainer_stub.train has no main(); skipping the trainer section.")
        return
    argv = ["trainer_stub.train", *trainer_args.split()]
    print(f"running {' '.join(argv)}")
    saved, sys.argv = sys.argv, argv
    try:
        main()
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import ray
    from ray.autoscaler.sdk import request_resources

    # Under `ray job submit` RAY_ADDRESS is set; under `ray submit` the script runs on the head.
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
    try:
        wait_for_tpu_hosts(args.num_workers, args.devices_per_worker, args.wait_minutes * 60)
        run_rollouts(args)
    finally:
        # Drop the standing request so idle TPU hosts can be removed after idle_timeout_minutes.
        request_resources(bundles=[])
    if args.trainer:
        run_trainer_stub(args.trainer_args)


if __name__ == "__main__":
    main()
