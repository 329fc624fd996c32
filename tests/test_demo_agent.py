"""`rollout demo --agent`: GRPO on multi-turn calculator episodes (model, tool, model), held as
token-exact rollout.Trajectory objects, on one local engine.

The reward rises within a few of the demo's steps, and the on-policy logprob check holds over the
masked-in (model) tokens of every episode: a loss mask off by one token, or one that let the
tool's tokens in (their rollout logprob is 0, the trainer's is not), or a model turn that was
re-tokenized, would show as a large difference.
"""

from __future__ import annotations

from test_demo import check_demo_outputs, run_cli


def test_agent_demo_reward_rises_with_tool_tokens_masked_and_logprobs_on_policy(tmp_path):
    steps = 10
    proc = run_cli("demo", "--agent", "--backend", "local", "--steps", str(steps), "--out-dir", str(tmp_path))
    assert "task: agent episodes" in proc.stdout, proc.stdout + proc.stderr
    records = check_demo_outputs(proc, tmp_path, steps=steps)
    rewards = [r["mean_reward"] for r in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    assert all(r["logprob_max_diff"] <= 1e-4 for r in records), [r["logprob_max_diff"] for r in records]
