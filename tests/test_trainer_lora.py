"""The demo's loop with `--lora`: the trainer trains an adapter and syncs only it, against one
in-process engine; the on-policy logprob check holds, and catches an adapter the engine never
applied."""

from __future__ import annotations

import numpy as np

from trainer_stub import model_io, train

RANK = 16
ON_POLICY_LOGPROB_DIFF = 1e-4  # measured ~2e-6
NOT_APPLIED_LOGPROB_DIFF = 1e-2


def lora_loop(demo_client, demo_model, demo_task, steps: int) -> list[train.StepRecord]:
    model_def, params = model_io.load_params(demo_model)
    config = train.LoopConfig(steps=steps, seed=0, lora_rank=RANK, learning_rate=train.LORA_LEARNING_RATE)
    return train.run_loop(demo_client, model_def, params, demo_task, config).records


def test_lora_loop_learns_on_policy_with_adapter_only_syncs(demo_client, demo_model, demo_task):
    records = lora_loop(demo_client, demo_model, demo_task, steps=12)
    assert max(r.logprob_diff for r in records) <= ON_POLICY_LOGPROB_DIFF
    assert all(r.version_ok for r in records)
    assert np.mean([r.mean_reward for r in records[-3:]]) > records[0].mean_reward + 0.3
    from rollout.weights.lora import linear_modules

    spec = demo_client.engine.spec.by_path()
    adapter_bytes = sum(RANK * sum(spec[p].shape) * 4 for p in linear_modules(demo_client.engine.spec).values())
    assert [r.sync_bytes for r in records] == [adapter_bytes] * len(records)  # r x (in + out) float32 per layer
    assert adapter_bytes < demo_client.engine.spec.nbytes / 3  # ~30% on this hidden-64 toy; ~1-2% at real sizes


def test_an_adapter_the_engine_never_applied_shows_as_a_large_logprob_difference(
    demo_client, demo_model, demo_task, monkeypatch
):
    engine = demo_client.engine
    # the engine stages the base instead of merging the adapter: syncs "succeed", versions move
    monkeypatch.setattr(
        engine,
        "stage_adapter",
        lambda version, adapter, **kw: engine.stage(
            version, {p: np.asarray(a) for p, a in engine._base.current()[0].items()}
        ),
    )
    records = lora_loop(demo_client, demo_model, demo_task, steps=3)
    assert all(r.version_ok for r in records)  # the version check alone cannot see it
    assert records[0].logprob_diff <= ON_POLICY_LOGPROB_DIFF  # the base, synced in full first
    assert records[1].logprob_diff > NOT_APPLIED_LOGPROB_DIFF
