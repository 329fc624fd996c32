"""What the demo shows: the progress bar, the summary table, the reward plot, a status line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainer_stub.records import LoopConfig, LoopResult, StepRecord


def summarize(result: LoopResult, loop: LoopConfig, *, wall_s: float, startup_s: float) -> dict[str, Any]:
    import numpy as np

    recs = result.records
    k = min(5, len(recs))
    unavailable = result.logprob_check_unavailable
    diffs = [r.logprob_diff for r in recs if r.logprob_diff is not None]
    on_policy = [
        r.logprob_diff for r in recs
        if r.logprob_diff is not None and r.version_ok and r.step not in _unsynced_steps(loop, len(recs))
    ]
    syncs = [r.sync_ms for r in recs if r.synced]
    unreplayed = [r.logprob_max_diff_unreplayed for r in recs if r.logprob_max_diff_unreplayed is not None]
    nan = float("nan")
    return {
        "steps": len(recs),
        "first5_reward": float(np.mean([r.mean_reward for r in recs[:k]])) if recs else nan,
        "last5_reward": float(np.mean([r.mean_reward for r in recs[-k:]])) if recs else nan,
        # None (JSON null) where the backend returns no logprobs: the check did not run
        "logprob_check": "unavailable" if unavailable is not None else "on-policy",
        "logprob_check_unavailable_reason": unavailable,
        "max_logprob_diff_on_policy": None if unavailable is not None else (max(on_policy) if on_policy else nan),
        "max_logprob_diff": None if unavailable is not None else max(diffs, default=nan),
        # MoE models: the largest per-token difference with the trainer's own routing (no replay)
        "max_token_logprob_diff_unreplayed": max(unreplayed) if unreplayed else None,
        "versions_ok": all(r.version_ok for r in recs),
        "final_version": recs[-1].new_version if recs else 0,
        "median_sync_ms": float(np.median(syncs)) if syncs else float("nan"),
        "median_sync_bytes": int(np.median([r.sync_bytes for r in recs if r.synced])) if syncs else 0,
        "lora_rank": loop.lora_rank,  # 0: full-weight syncs
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
        diff = "n/a" if r.logprob_diff is None else f"{r.logprob_diff:.2e}"
        lines.append(
            f"{r.step:>5} {r.mean_reward:>7.3f} {r.weight_version:>8} {r.sync_ms:>8.1f} "
            f"{diff:>13} {r.tokens_per_s:>8.0f}  {example!r}"
        )
    lines.append("-" * 78)
    reason = summary.get("logprob_check_unavailable_reason")
    check = (
        f"UNAVAILABLE on this engine backend: {reason}"
        if reason is not None
        else f"{summary['max_logprob_diff_on_policy']:.2e}"
    )
    lines += [
        f"mean reward, first 5 steps      {summary['first5_reward']:.3f}",
        f"mean reward, last 5 steps       {summary['last5_reward']:.3f}",
        f"max logprob diff (on-policy)    {check}",
        *([f"max token diff without replay   {summary['max_token_logprob_diff_unreplayed']:.2e} "
           "(MoE: the trainer's own routing instead of the rollout's)"]
          if summary.get("max_token_logprob_diff_unreplayed") is not None else []),
        f"every sample from synced weights {summary['versions_ok']}",
        f"weight version at the end       {summary['final_version']}",
        f"median sync                     {summary['median_sync_ms']:.1f} ms, "
        f"{summary['median_sync_bytes'] / 2**20:.3f} MiB"
        + (f" (LoRA rank {summary['lora_rank']}: the adapter only)" if summary["lora_rank"] else " (full weights)"),
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
    checked = [r for r in records if r.logprob_diff is not None]
    if checked:
        bottom.semilogy([r.step for r in checked], [max(r.logprob_diff or 0.0, 1e-12) for r in checked], marker=".", color="tab:red")
        bottom.axhline(1e-4, color="gray", linestyle="--", linewidth=1, label="on-policy bound 1e-4")
        bottom.legend(loc="upper right")
    else:
        bottom.text(0.5, 0.5, "logprob check unavailable on this engine backend", ha="center", va="center",
                    transform=bottom.transAxes)
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


def progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="RL steps", unit="step", dynamic_ncols=True)


def printer(enabled: bool) -> Callable[[str], None]:
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
