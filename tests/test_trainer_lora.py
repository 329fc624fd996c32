"""The demo's loop with `--lora`: the trainer trains an adapter and syncs only it, against one
in-process engine; the on-policy logprob check holds, and catches an adapter the engine never
applied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer_stub import clients, model_io, train
from trainer_stub.tasks import DigitsTask

RANK = 16
ON_POLICY_LOGPROB_DIFF = 1e-4  # measured ~2e-6
NOT_APPLIED_LOGPROB_DIFF = 1e-2


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train.builtin_checkpoint(tmp_path_factory.mktemp("demo") / "tiny-qwen3")


@pytest.fixture(scope="module")
def task(demo_model: Path) -> DigitsTask:
    from rollout.tokenizer import Tokenizer

    return DigitsTask.for_tokenizer(Tokenizer.from_pretrained(demo_model))


@pytest.fixture(scope="module")
def client(demo_model: Path):
    c = clients.LocalEngineClient(demo_model, clients.FleetOptions(devices_per_worker=2))
    yield c
    c.shutdown()


def lora_loop(client, demo_model, task, steps: int) -> list[train.StepRecord]:
    model_def, params = model_io.load_params(demo_model)
    config = train.LoopConfig(steps=steps, seed=0, lora_rank=RANK, learning_rate=train.LORA_LEARNING_RATE)
    return train.run_loop(client, model_def, params, task, config).records


def test_lora_loop_learns_on_policy_with_adapter_only_syncs(client, demo_model, task):
    records = lora_loop(client, demo_model, task, steps=12)
    assert max(r.logprob_diff for r in records) <= ON_POLICY_LOGPROB_DIFF
    assert all(r.version_ok for r in records)
    assert np.mean([r.mean_reward for r in records[-3:]]) > records[0].mean_reward + 0.3
    from rollout.weights.lora import linear_modules

    spec = client.engine.spec.by_path()
    adapter_bytes = sum(RANK * sum(spec[p].shape) * 4 for p in linear_modules(client.engine.spec).values())
    assert [r.sync_bytes for r in records] == [adapter_bytes] * len(records)  # r x (in + out) float32 per layer
    assert adapter_bytes < client.engine.spec.nbytes / 3  # ~30% on this hidden-64 toy; ~1-2% at real sizes


def test_an_adapter_the_engine_never_applied_shows_as_a_large_logprob_difference(
    client, demo_model, task, monkeypatch
):
    engine = client.engine
    # the engine stages the base instead of merging the adapter: syncs "succeed", versions move
    monkeypatch.setattr(engine, "stage_adapter", lambda version, adapter, **kw: engine.stage(
        version, {p: np.asarray(a) for p, a in engine._base.current()[0].items()}))
    records = lora_loop(client, demo_model, task, steps=3)
    assert all(r.version_ok for r in records)  # the version check alone cannot see it
    assert records[0].logprob_diff <= ON_POLICY_LOGPROB_DIFF  # the base, synced in full first
    assert records[1].logprob_diff > NOT_APPLIED_LOGPROB_DIFF
