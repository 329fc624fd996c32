"""Tunix's GRPO learner trains a tiny Qwen3 on fleet rollouts: the reward rises, each sync is timed.

    python -m rollout.integrations.tunix_demo --steps 20

Tunix owns the training: its Qwen3 (built from a tiny HF checkpoint made here, no download), its
RLCluster with `FleetRollout` as the rollout engine, its trainer and GRPO learner. The fleet (a
local Ray on loopback, `--workers` x 1 simulated CPU device, started with dummy weights) gets the
actor's weights by `update_params` before the first step and after every step. The task is the
toy verifiable reward of `rollout demo`: the fraction of a completion's characters that are
digits. One JSON line per step (reward, the weight version the rollouts came from, sync seconds)
and a summary table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = ("Write a number:", "Phone:", "The year is", "My PIN is", "Count to ten:", "Pick a number:")


def digit_fraction(text: str) -> float:
    """>>> digit_fraction("a1b2"), digit_fraction("")
    (0.5, 0.0)"""
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rollout.integrations.tunix_demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--steps", type=int, default=20, help="GRPO steps (one rollout batch and one update each)")
    parser.add_argument("--workers", type=int, default=2, help="fleet workers, one simulated CPU device each")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="samples per prompt (GRPO group size)")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write the checkpoint and steps.jsonl")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="tunix_demo_"))
    out_dir.mkdir(parents=True, exist_ok=True)

    import functools

    import jax
    import numpy as np
    import optax
    import ray
    from tunix.rl import rl_cluster as rl
    from tunix.rl.grpo import grpo_learner as grpo
    from tunix.rl.rollout import base_rollout

    import rollout
    from rollout.integrations.tunix import FleetRollout, FleetTokenizer, load_tunix_qwen3
    from rollout.local_ray import start_local_ray
    from rollout.testing import make_tiny_checkpoint

    start = time.perf_counter()
    # RoPE theta 1e6: Tunix's Qwen3 applies it whatever its config says (see tunix_qwen3_config)
    checkpoint = make_tiny_checkpoint(out_dir / "tiny_qwen3", "Qwen3ForCausalLM", seed=args.seed, rope_theta=1e6)
    steps: list[dict[str, Any]] = []
    rewards: list[float] = []

    class DemoRollout(FleetRollout):
        """Prints one JSON line per step when its update is synced."""

        def update_params(self, params: Any, filter_types: Any = None) -> None:
            super().update_params(params, filter_types)
            sync = self.history[-1]
            if not rewards:  # the actor's initial weights
                print(json.dumps({"event": "initial_sync", "version": sync["version"], "sync_s": sync["sync_s"]}))
                return
            generated = [h for h in self.history if h["event"] == "tunix_generate"][-1]
            record = {"step": len(steps) + 1, "mean_reward": round(rewards[-1], 4),
                      "rollout_version": generated["versions"], "new_version": sync["version"],
                      "sync_s": sync["sync_s"], "map_s": sync["map_s"]}
            steps.append(record)
            print(json.dumps(record), flush=True)

    def reward_fn(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        scores = [digit_fraction(text) for text in completions]
        rewards.append(float(np.mean(scores)))
        return scores

    own_ray = not ray.is_initialized()
    if own_ray:
        start_local_ray(num_cpus=max(2, args.workers + 1))
    with rollout.RolloutService(checkpoint, num_workers=args.workers, devices_per_worker=1, accelerator="cpu",
                                load_format="dummy", max_batch=32, max_seq_len=64) as service:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
        actor = load_tunix_qwen3(checkpoint, mesh)
        config = rl.ClusterConfig(
            role_to_mesh={rl.Role.ACTOR: mesh, rl.Role.ROLLOUT: mesh, rl.Role.REFERENCE: mesh},
            rollout_engine=functools.partial(DemoRollout, service=service),
            training_config=rl.RLTrainingConfig(actor_optimizer=optax.adam(args.learning_rate),
                                                eval_every_n_steps=10**9, max_steps=args.steps),
            rollout_config=base_rollout.RolloutConfig(
                max_tokens_to_generate=args.max_tokens, temperature=1.0, top_p=1.0, max_prompt_length=16,
                seed=None, return_logprobs=True),
        )
        cluster = rl.RLCluster(actor=actor, tokenizer=FleetTokenizer(service.tokenizer), cluster_config=config)
        learner = grpo.GRPOLearner(cluster, grpo.GRPOConfig(num_generations=args.generations, beta=0.0),
                                   reward_fns=reward_fn)
        rng = np.random.default_rng(args.seed)
        data = [{"prompts": rng.choice(PROMPTS, size=args.prompts_per_step)} for _ in range(args.steps)]
        learner.train(data)
    if own_ray:
        ray.shutdown()

    (out_dir / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    print_summary(steps, time.perf_counter() - start, out_dir)
    return 0


def print_summary(steps: list[dict[str, Any]], seconds: float, out_dir: Path) -> None:
    if not steps:
        print("no step finished")
        return
    print(f"\n{'step':>4}  {'mean reward':>11}  {'rollout version':>15}  {'sync ms':>8}")
    for s in steps:
        print(f"{s['step']:>4}  {s['mean_reward']:>11.3f}  {str(s['rollout_version']):>15}  {s['sync_s'] * 1000:>8.1f}")
    k = max(1, len(steps) // 4)
    first = sum(s["mean_reward"] for s in steps[:k]) / k
    last = sum(s["mean_reward"] for s in steps[-k:]) / k
    syncs = sorted(s["sync_s"] for s in steps)
    print(f"\nmean reward: first {k} step(s) {first:.3f} -> last {k} step(s) {last:.3f}; "
          f"sync median {syncs[len(syncs) // 2] * 1000:.1f} ms; {seconds:.0f} s in all; steps.jsonl in {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
