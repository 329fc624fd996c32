"""`rollout demo --agent`: GRPO on a toy multi-turn environment with a tool, token-exact.

An episode is a conversation held as a `rollout.Trajectory` (token ids, loss mask, logprobs):

    user:       a question ("Add the numbers you need, then answer: what is 3 + 4?")
    model:      turn 1, sampled (its text is the calculator's input)
    tool:       the calculator's reply: the sum of the numbers the model wrote, or an error
    model:      turn 2, sampled from the whole conversation so far, as token ids

The reward is per trajectory and verifiable (a rule, no judge model): the fraction of the
model's tokens, over both turns, that are digit tokens (trainer_stub.tasks.DigitsTask's rule), so
a tiny random model has a signal from the first step and learns within the demo's steps. The
tool's reply is full of digits too, which is why the loss mask matters: the policy gradient runs
over the model's tokens only (Trajectory.loss_mask), never over the tool's or the template's,
and the reward counts the model's tokens only.

Every model turn is sampled from `Trajectory.prompt()` (ids, never re-rendered text), so the
trainer's recomputed logprobs at the masked-in positions are those of the very tokens sampled,
and the on-policy logprob check of the plain demo holds across turns.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rollout.trajectory import Trajectory
from trainer_stub.records import LoopConfig, LoopResult, StepRecord
from trainer_stub.tasks import DigitsTask

AGENT_QUESTIONS: tuple[str, ...] = ("What is 3 + 4?", "Add 12 and 30.", "7 + 8 + 9 = ?", "Sum 1999 and 1.")
AGENT_MAX_SEQ_LEN = 256  # the engine's context for an episode: opening, two turns, the tool's reply


def calculator(text: str) -> str:
    """The tool: adds every number written in `text`.

    >>> calculator("3 and 4 "), calculator("none")
    ('3 + 4 = 7', 'error: no numbers')
    """
    numbers = [int(n[:6]) for n in re.findall(r"\d+", text)][:4]  # a short reply: the context is small
    if not numbers:
        return "error: no numbers"
    return f"{' + '.join(map(str, numbers))} = {sum(numbers)}"


@dataclasses.dataclass(frozen=True)
class CalculatorEnv:
    """Two model turns around one calculator call; reward = digit fraction of the model's tokens."""

    tokenizer: Any  # a rollout Tokenizer: the chat template renders the turns
    digits: DigitsTask
    questions: tuple[str, ...] = AGENT_QUESTIONS

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> CalculatorEnv:
        return cls(tokenizer, DigitsTask.for_tokenizer(tokenizer))

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.questions

    def opening(self, question: str) -> Trajectory:
        return Trajectory(self.tokenizer, [{"role": "user", "content": question}])

    def reward(self, traj: Trajectory) -> float:
        model_tokens = [t for t, m in zip(traj.token_ids, traj.loss_mask) if m]
        return self.digits.reward(model_tokens)

    def rollout(self, client: Any, config: LoopConfig, step: int, return_logprobs: bool) -> tuple[list[Trajectory], np.ndarray]:
        """One GRPO batch: `group_size` episodes per question; (trajectories, group id of each)."""
        from rollout.engine.sampling_params import SamplingParams

        seed = config.seed + 2 * step
        openings = [self.opening(q) for q in self.questions]
        first = client.generate(
            [t.prompt() for t in openings],
            SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, n=config.group_size, seed=seed),
            return_logprobs=return_logprobs,
        )
        trajs, groups = [], []
        for out in first:
            traj = openings[out.prompt_index].copy().add_model_turn(out)
            traj.add_message({"role": "tool", "content": calculator(out.text)})
            trajs.append(traj)
            groups.append(out.prompt_index)
        second = client.generate(
            [t.prompt() for t in trajs],
            SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, seed=seed + 1),
            return_logprobs=return_logprobs,
        )
        for out in second:
            trajs[out.prompt_index].add_model_turn(out)
        return trajs, np.asarray(groups)


def trajectory_batch(trajs: Sequence[Trajectory], advantages: np.ndarray, pad_to: int) -> Any:
    """A grpo.Batch of whole trajectories: target t (predicting token t + 1) is in the loss where
    token t + 1 is the model's (Trajectory.loss_mask); the rollout's logprobs sit there."""
    from trainer_stub.grpo import Batch

    b = len(trajs)
    tokens = np.zeros((b, pad_to), np.int32)
    attention = np.zeros((b, pad_to), np.int32)
    target = np.zeros((b, pad_to - 1), np.float32)
    logprobs = np.zeros((b, pad_to - 1), np.float32)
    for i, traj in enumerate(trajs):
        n = len(traj.token_ids)
        if n > pad_to:
            raise ValueError(f"trajectory {i} has {n} tokens, more than pad_to={pad_to}; raise pad_to")
        tokens[i, :n] = traj.token_ids
        attention[i, :n] = 1
        target[i, : n - 1] = traj.loss_mask[1:]
        logprobs[i, : n - 1] = traj.logprobs[1:]
    return Batch(tokens, attention, target, np.asarray(advantages, np.float32), logprobs)


def run_agent_loop(
    client: Any,
    model_def: Any,
    params: dict[str, Any],
    env: CalculatorEnv,
    config: LoopConfig = LoopConfig(),
    *,
    sync: Callable[..., int],
    unavailable: str | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> LoopResult:
    """`config.steps` GRPO steps on `env` against `client` (train.run_loop's loop, with episodes
    of several turns instead of single completions); per-step records and final params.
    `sync(client, params, previous=version)`: train.py's checked sync; `unavailable`: why the
    backend returns no logprobs (None: the logprob check runs)."""
    import jax

    from trainer_stub import grpo

    if config.lora_rank or model_def.config.is_moe:
        raise ValueError("the agent demo trains a dense model with full weights: leave out --lora and --moe")
    start = time.perf_counter()
    version = sync(client, params, previous=-1)
    initial_sync_ms = (time.perf_counter() - start) * 1e3
    optimizer, train_step = grpo.train_step_for(model_def, config.learning_rate, config.temperature,
                                                tis_cap=config.tis_cap)
    opt_state = grpo.on_trainer_device(optimizer.init(params))
    full_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(params))
    pad_to = 0
    records: list[StepRecord] = []
    for step in range(config.steps):
        t0 = time.perf_counter()
        trajs, groups = env.rollout(client, config, step, unavailable is None)
        generate_s = time.perf_counter() - t0
        rewards = np.array([env.reward(t) for t in trajs], np.float32)
        advantages = grpo.group_advantages(rewards, groups)
        longest = max(len(t.token_ids) for t in trajs)
        if longest > pad_to:  # with headroom, so the jitted step keeps one shape
            pad_to = -(-(longest + 32) // 32) * 32
        batch = trajectory_batch(trajs, advantages, pad_to)
        t0 = time.perf_counter()
        params, opt_state, metrics = train_step(
            params, opt_state, grpo.batch_arrays(batch, rollout_logprobs=config.tis_cap is not None)
        )
        diff_mean = diff_max = None
        if unavailable is None:
            diff_mean, diff_max = grpo.logprob_diff(batch, np.asarray(metrics["logprobs"]))
        jax.block_until_ready(params)
        train_s = time.perf_counter() - t0
        served = {v for t in trajs for v, m in zip(t.weight_versions, t.loss_mask) if m}
        expected, synced = version, config.syncs_after(step)
        sync_ms = 0.0
        if synced:
            t0 = time.perf_counter()
            version = sync(client, params, previous=version)
            sync_ms = (time.perf_counter() - t0) * 1e3
        tokens = sum(t.model_token_count for t in trajs)
        record = StepRecord(
            step=step, mean_reward=float(rewards.mean()), min_reward=float(rewards.min()),
            max_reward=float(rewards.max()), weight_version=max(served), expected_version=expected,
            version_ok=served == {expected}, logprob_diff=diff_mean, logprob_max_diff=diff_max,
            loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]), tokens=tokens,
            generate_s=generate_s, tokens_per_s=tokens / max(generate_s, 1e-9), train_s=train_s, synced=synced,
            sync_ms=sync_ms, new_version=version, example=env.tokenizer.decode(trajs[0].token_ids[-48:]),
            sync_bytes=full_bytes if synced else 0,
        )
        records.append(record)
        if on_step is not None:
            on_step(record)
    return LoopResult(records, params, initial_sync_ms, unavailable)
