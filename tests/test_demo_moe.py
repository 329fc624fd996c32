"""`rollout demo --moe`: the built-in tiny Qwen3-MoE trained with routing replay, on one local
engine (a few steps each).

In float32 the trainer's recompute with the rollout's routes replayed matches the rollout's
logprobs every step. Without replay the difference is the same there: on-policy in float32 the
trainer's router picks the very experts the rollout picked (the top-k probabilities are far
apart compared with float32 rounding). In bfloat16 rounding does flip routes, and replay is what
keeps the difference down: every step, the largest per-token difference without replay is larger
than with it.
"""

from __future__ import annotations

from pathlib import Path

from test_demo import check_demo_outputs, run_cli


def _demo(out_dir: Path, *extra: str, steps: int) -> list[dict]:
    proc = run_cli("demo", "--moe", "--backend", "local", "--steps", str(steps), "--group-size", "4",
                   "--out-dir", str(out_dir), *extra)
    assert "routing replay: on" in proc.stdout, proc.stdout + proc.stderr
    assert (out_dir / "tiny-qwen3-moe" / "config.json").is_file()
    return check_demo_outputs(proc, out_dir, steps=steps)


def test_moe_demo_logprob_check_holds_every_step_with_routes_replayed(tmp_path):
    records = _demo(tmp_path, steps=3)
    assert all(r["logprob_max_diff"] <= 1e-4 for r in records), [r["logprob_max_diff"] for r in records]
    assert all(r["logprob_diff_unreplayed"] is not None for r in records)


def test_moe_demo_in_bfloat16_differs_more_without_replay(tmp_path):
    records = _demo(tmp_path, "--dtype", "bfloat16", steps=2)
    for r in records:
        assert r["logprob_max_diff_unreplayed"] > r["logprob_max_diff"], r
        assert r["logprob_diff_unreplayed"] > r["logprob_diff"], r
