"""The RL loop's settings and what it records: `LoopConfig` (what a run is told), `StepRecord`
(one step: rewards, versions, the logprob check, timings) and `LoopResult` (the whole run).

Shared by train.py, which runs the loop and fills them, and report.py, which summarizes them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

DEMO_STEPS = 40  # the demo's default run length


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
    # > 0: train a rank-`lora_rank` LoRA adapter on every linear layer (base frozen) and sync only
    # the adapter (trainer_stub/lora.py); LoRA wants a larger learning rate than full training
    lora_rank: int = 0
    # mixture-of-experts models: ask the rollout for each sample's routed experts and replay them
    # in the trainer's forward (routing replay); False recomputes with the trainer's own routing
    replay_routes: bool = True
    # the trainer recomputes logprobs with rollout.models.token_logprobs in batch-invariant mode:
    # bit for bit the rollout's when the rollout runs with batch_invariant=True on as many devices
    batch_invariant: bool = False
    # truncated importance sampling (trainer_stub/grpo.py): weight each token by
    # min(pi_trainer / pi_rollout, tis_cap), correcting a rollout that samples from slightly other
    # probabilities (int8/bfloat16 engine); None: off. verl's default cap is 2
    tis_cap: float | None = None

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
    logprob_diff: float | None  # mean |trainer - rollout| logprob over completion tokens; None: unavailable
    logprob_max_diff: float | None
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
    sync_bytes: int = 0  # bytes this step's sync sent (the adapter's with --lora); 0 when skipped
    # MoE models: the same difference, mean and max, with the trainer's own routing instead of the
    # rollout's replayed routes (what replay saves); None for dense models or without logprobs
    logprob_diff_unreplayed: float | None = None
    logprob_max_diff_unreplayed: float | None = None

    def to_json(self) -> str:
        return json.dumps({"event": "step", **dataclasses.asdict(self)}, ensure_ascii=False)


@dataclasses.dataclass
class LoopResult:
    records: list[StepRecord]
    params: dict[str, Any]
    initial_sync_ms: float
    logprob_check_unavailable: str | None = None  # why the backend returns no logprobs; None: checked
