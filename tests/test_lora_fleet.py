"""LoRA adapter syncs on a fleet on local Ray (2 workers x 2 simulated devices): only the adapter
crosses the object store, the two-phase commit and versions as for a full sync, refusals and
failures keep the old adapter serving, restarted workers catch up onto the right base."""

from __future__ import annotations

import pytest
from lora_reference import peft_model, save_adapter

import rollout
from rollout.weights.loader import iter_tensors
from rollout.weights.lora import LoraAdapter, LoraAdapterError

from reliability.fault_worker import FaultyWorker

pytestmark = pytest.mark.ray

CONFIG = dict(num_workers=2, devices_per_worker=2, accelerator="cpu", max_batch=8, max_seq_len=128, decode_steps=4,
              bucket_bytes=64 << 10)
GREEDY = rollout.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [[7, 8, 9, 10], [1, 2, 3, 4, 5, 6]]


@pytest.fixture(scope="module")
def service(ray_local, tiny_qwen3):
    with rollout.RolloutService(tiny_qwen3, worker_class=FaultyWorker, **CONFIG) as svc:
        yield svc


@pytest.fixture(scope="module")
def reference(tiny_qwen3):
    """A single-process engine with the fleet's engine config on 2 local devices."""
    import jax

    from rollout.engine.native.engine import Engine

    cfg = rollout.EngineConfig(max_batch=8, max_seq_len=128, decode_steps=4)
    with Engine(tiny_qwen3, cfg, devices=jax.devices()[:2]) as engine:
        yield engine


@pytest.fixture(scope="module")
def adapters(tiny_qwen3, tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("adapters")
    return [save_adapter(peft_model(tiny_qwen3, seed=seed), root / str(seed)) for seed in (11, 12)]


def reference_tokens(engine, update, *, adapter: bool) -> list[tuple[int, ...]]:
    version = engine.version + 1
    (engine.stage_adapter if adapter else engine.stage)(version, update)
    engine.commit(version, wait=True)
    return [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]


def worker_outputs(service, worker: int) -> tuple[list[tuple[int, ...]], set[int]]:
    outs = service.generate(PROMPTS, GREEDY, worker=worker)
    return [c.token_ids for c in outs], {v for c in outs for v in c.token_versions}


def test_an_adapter_directory_syncs_as_the_next_version_on_every_worker(service, reference, adapters, tiny_qwen3):
    service.sync_weights(dict(iter_tensors(tiny_qwen3)))  # the base, as the reference has it
    reference_tokens(reference, dict(iter_tensors(tiny_qwen3)), adapter=False)
    version = service.sync_weights(str(adapters[0]))
    want = reference_tokens(reference, LoraAdapter.from_peft_dir(adapters[0]), adapter=True)
    assert version == service.version
    for worker in range(2):
        tokens, versions = worker_outputs(service, worker)
        assert tokens == want
        assert versions == {version}  # per-token versions as for a full sync
    record = service.status()["syncs"][-1]
    assert record["source"] == "lora" and record["ok"]
    assert 0 < record["nbytes"] < service.spec.nbytes / 5  # only the adapter crossed the object store


def test_a_bad_adapter_is_refused_before_any_transfer_and_the_old_adapter_keeps_serving(
    service, adapters, monkeypatch
):
    import ray

    service.sync_weights(LoraAdapter.from_peft_dir(adapters[0]))
    before = [worker_outputs(service, w) for w in range(2)]
    good = LoraAdapter.from_peft_dir(adapters[1])
    name = next(k for k in good.tensors if "layers.1.mlp.up_proj.lora_A" in k)
    bad = LoraAdapter({**good.tensors, name: good.tensors[name][:, :-1]}, good.config)
    puts = []
    monkeypatch.setattr(ray, "put", lambda *a, **k: puts.append(a))
    with pytest.raises(LoraAdapterError, match=r"up_proj.kernel: lora_A expected shape"):
        service.sync_weights(bad)
    assert puts == []
    monkeypatch.undo()
    assert [worker_outputs(service, w) for w in range(2)] == before


def test_one_worker_failing_to_stage_an_adapter_aborts_it_everywhere(service, adapters):
    import ray

    service.sync_weights(LoraAdapter.from_peft_dir(adapters[0]))
    before_version = service.version
    before = [worker_outputs(service, w) for w in range(2)]
    ray.get(service.workers[1].inject_fault.remote("stage", message="device on fire"))
    with pytest.raises(rollout.SyncError) as info:
        service.sync_weights(LoraAdapter.from_peft_dir(adapters[1]))
    assert info.value.failures.keys() == {1}
    assert service.version == before_version
    status = service.status()
    assert [(w["version"], w["staged_version"]) for w in status["workers"]] == [(before_version, None)] * 2
    assert [worker_outputs(service, w) for w in range(2)] == before


def test_a_restarted_worker_catches_up_with_the_base_and_the_adapter(
    service, reference, adapters, tiny_qwen3_perturbed, caplog
):
    import ray

    assert service.wait_for_workers(timeout=120)
    service.sync_weights(dict(iter_tensors(tiny_qwen3_perturbed)))  # a new base, then adapters on it
    service.sync_weights(LoraAdapter.from_peft_dir(adapters[0]))
    version = service.sync_weights(LoraAdapter.from_peft_dir(adapters[1]))
    reference_tokens(reference, dict(iter_tensors(tiny_qwen3_perturbed)), adapter=False)
    want = reference_tokens(reference, LoraAdapter.from_peft_dir(adapters[1]), adapter=True)
    assert worker_outputs(service, 1) == (want, {version})
    ray.kill(service.workers[0], no_restart=False)
    assert worker_outputs(service, 0) == (want, {version})  # waits for the restart and its catch-up
    assert [w["version"] for w in service.status()["workers"]] == [version, version]


def test_an_adapter_on_a_backend_without_lora_is_refused_before_any_worker_changes(service, adapters):
    from rollout.engine.backend import EngineCapabilities, FeatureUnavailableError

    versions = [w["version"] for w in service.status()["workers"]]
    saved = service.capabilities
    service.capabilities = EngineCapabilities(unavailable={"lora": "no adapters on this backend"})
    try:
        with pytest.raises(FeatureUnavailableError, match="no adapters on this backend"):
            service.sync_weights(str(adapters[0]))
    finally:
        service.capabilities = saved
    assert [w["version"] for w in service.status()["workers"]] == versions
    assert "lora" not in saved.unavailable  # the fleet's own backend (native) serves adapters
