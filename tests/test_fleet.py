"""The fleet on local Ray: 2 workers x 2 simulated devices, weight sync, routing, failures.

One module-scoped service serves most tests (starting workers costs seconds). Tests that kill
workers run last; each waits until the fleet is whole again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter

import numpy as np
import pytest

import rollout
from rollout.weights.loader import iter_tensors
from rollout.weights.spec import flatten_params

from reliability.fault_worker import FaultyWorker

pytestmark = pytest.mark.ray

# small buckets: a sync of the tiny model takes ~10, so the pipelined path (and the coordinator's
# two pack buffers taking turns) is what every sync here runs through
CONFIG = dict(num_workers=2, devices_per_worker=2, accelerator="cpu", max_batch=8, max_seq_len=128, decode_steps=4,
              bucket_bytes=64 << 10)
GREEDY = rollout.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [[7, 8, 9, 10], "The quick brown fox", [1, 2, 3, 4, 5, 6]]


def hf_flat(path) -> dict[str, np.ndarray]:
    return dict(iter_tensors(path))


def nested(flat: dict[str, np.ndarray]) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}} (engine layout as a nested tree)."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return root


@pytest.fixture(scope="module")
def service(ray_local, tiny_qwen3, tmp_path_factory):
    # a persistent compilation cache lets restarted workers skip recompiling (seconds each here)
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    # FaultyWorker: the product's worker with faults the tests arm (tests/reliability/fault_worker.py)
    with rollout.RolloutService(tiny_qwen3, env_vars=cache, worker_class=FaultyWorker, **CONFIG) as svc:
        yield svc


@pytest.fixture(scope="module")
def reference(tiny_qwen3):
    """A single-process engine with the fleet's engine config on 2 local devices."""
    import jax

    from rollout.engine.native.engine import Engine

    cfg = rollout.EngineConfig(max_batch=8, max_seq_len=128, decode_steps=4)
    with Engine(tiny_qwen3, cfg, devices=jax.devices()[:2]) as engine:
        yield engine


def reference_tokens(engine, params) -> list[tuple[int, ...]]:
    version = engine.version + 1
    engine.stage(version, params)
    engine.commit(version, wait=True)
    return [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]


def worker_outputs(svc, worker: int):
    outs = svc.generate(PROMPTS, GREEDY, worker=worker, timeout=120)
    return [c.token_ids for c in outs], {c.weight_version for c in outs}


def routed(svc) -> int:
    return sum(w["routed_requests"] for w in svc._router.snapshot())


# -- routing and placement as plain Python ---------------------------------------------------


def test_the_router_picks_the_live_worker_with_the_least_outstanding_tokens():
    from rollout.coordinator.routing import DOWN, Router

    router = Router(3)
    assert [router.acquire(cost) for cost in (100, 50, 10)] == [0, 1, 2]
    assert router.acquire(30) == 2  # 10 + 30 < 50 < 100
    router.release(0, 100)
    assert router.acquire(1) == 0
    router.mark(0, DOWN)
    assert router.acquire(1, avoid=frozenset([1])) == 2
    assert router.acquire(1, avoid=frozenset([1, 2])) in (1, 2)  # avoid is a preference


def test_a_pinned_request_waits_for_its_worker_and_a_dead_one_is_refused():
    from rollout.coordinator.routing import DEAD, DOWN, UP, Router

    router = Router(2)
    router.mark(1, DOWN)
    with pytest.raises(TimeoutError):
        router.acquire(5, worker=1, timeout=0.05)
    threading.Timer(0.1, router.mark, (1, UP)).start()
    assert router.acquire(5, worker=1, timeout=5) == 1
    router.mark(1, DEAD)
    with pytest.raises(LookupError, match="dead"):
        router.acquire(5, worker=1)


def test_a_stale_failure_does_not_take_a_worker_down_again():
    from rollout.coordinator.routing import DOWN, UP, Router

    router = Router(1)
    epoch = router.epoch(0)  # two requests sent to the first incarnation
    assert router.mark(0, DOWN, epoch)  # the first failure takes it down
    assert router.mark(0, UP)  # it came back
    assert not router.mark(0, DOWN, epoch)  # the second, older failure is stale
    assert router.snapshot()[0]["state"] == UP


def test_placement_is_checked_per_node_and_explained():
    from rollout.coordinator.fleet import check_placement
    from rollout.fleet_config import FleetConfig

    nodes = [{"CPU": 8.0, "TPU": 4.0}, {"CPU": 8.0, "TPU": 4.0}]
    check_placement(FleetConfig(num_workers=2, devices_per_worker=4), "tpu", nodes, {}, {})
    with pytest.raises(rollout.PlacementError) as info:  # 8 chips in all, but 4 per node
        check_placement(FleetConfig(num_workers=1, devices_per_worker=8), "tpu", nodes,
                        {"CPU": 16.0, "TPU": 8.0}, {"CPU": 10.0, "TPU": 8.0})
    message = str(info.value)
    assert "1 worker(s) x {'CPU': 1.0, 'TPU': 8}" in message
    assert "{'CPU': 16.0, 'TPU': 8.0} in total" in message and "can host 0 such worker(s)" in message


# -- placement on Ray ------------------------------------------------------------------------


def test_placement_that_cannot_be_satisfied_says_what_was_asked_and_what_the_cluster_has(ray_local, tiny_qwen3):
    with pytest.raises(rollout.PlacementError) as info:
        rollout.RolloutService(tiny_qwen3, num_workers=2, devices_per_worker=4, accelerator="tpu")
    message = str(info.value)
    assert "2 worker(s) x {'CPU': 1.0, 'TPU': 4}" in message
    assert "in total" in message and "available" in message and "`ray status`" in message


def test_workers_that_never_become_ready_time_out_with_the_placement_message(ray_local, tiny_qwen3):
    with pytest.raises(rollout.PlacementError, match=r"not ready after \d+s.*`ray status`"):
        rollout.RolloutService(tiny_qwen3, num_workers=1, devices_per_worker=1, accelerator="tpu",
                               check_resources=False, ready_timeout_s=2)


# -- generation --------------------------------------------------------------------------------


def test_generate_returns_each_prompts_samples_in_input_order(service):
    sampling = rollout.SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=5)
    outs = service.generate(PROMPTS * 2, sampling)
    assert [(c.prompt_index, c.sample_index) for c in outs] == [(p, s) for p in range(6) for s in range(3)]
    assert all(c.weight_version == service.version for c in outs)
    assert outs[0].prompt_token_ids == tuple(PROMPTS[0])
    assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in outs)


def test_near_zero_temperatures_give_the_greedy_tokens_and_finite_logprobs(service):
    greedy = [c.token_ids for c in service.generate(PROMPTS, GREEDY)]
    for temperature in (1e-3, 1e-6, 1e-8, 1e-12, 1e-30):
        sampling = rollout.SamplingParams(max_tokens=24, temperature=temperature, seed=1, ignore_eos=True)
        outs = service.generate(PROMPTS, sampling)
        assert [c.token_ids for c in outs] == greedy, temperature
        logprobs = np.array([c.logprobs for c in outs])
        assert np.all(np.isfinite(logprobs)) and logprobs.max() <= 0.0, temperature


@pytest.mark.parametrize(
    "prompts, sampling, error",
    [
        ([[1, 2], []], GREEDY, "prompt 1: empty prompt"),
        ([[1, 2], [1] * 120], GREEDY, "exceeds max_seq_len=128"),
        ([[1, 2], [1, 99999]], GREEDY, r"token id 99999 is outside the vocabulary \[0, 512\)"),
        ([[1, 2], [1.5]], GREEDY, "token ids must be integers"),
        ([[1, 2]], {"max_tokens": 3}, "sampling must be a rollout.SamplingParams"),
        ([], {"max_tokens": 3}, "sampling must be a rollout.SamplingParams"),
        ([[1, 2]], rollout.SamplingParams(n=9, max_tokens=4), "n=9 samples cannot run together in max_batch=8"),
        ("just a string", GREEDY, "prompts must be a list"),
        ([[1, 2]], rollout.SamplingParams(max_tokens=4, regex="(unclosed"), "regex could not be compiled"),
    ],
)
def test_bad_requests_are_refused_on_the_driver_before_anything_is_queued(service, prompts, sampling, error):
    before = routed(service)
    with pytest.raises((ValueError, TypeError), match=error):
        service.generate(prompts, sampling)
    assert routed(service) == before


def test_structured_output_runs_on_the_workers_and_each_sample_matches_its_regex(service):
    import re

    sampling = rollout.SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=2, regex="(red|green|blue)-[0-9]{2}")
    completions = service.generate(PROMPTS, sampling)
    assert len(completions) == 2 * len(PROMPTS)
    for c in completions:
        assert re.fullmatch("(red|green|blue)-[0-9]{2}", c.text) and c.finish_reason == "stop", c.text


def test_generate_async_yields_every_completion_once_as_prompts_finish(service):
    sampling = rollout.SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=1)
    stream = service.generate_async([[5, 6, 7]] * 6, sampling)
    seen = Counter((c.prompt_index, c.sample_index) for c in stream)
    assert seen == Counter({(p, s): 1 for p in range(6) for s in range(2)})

    async def consume():
        return [c async for c in service.generate_async([[5, 6, 7]] * 3, sampling)]

    outs = asyncio.run(consume())
    assert sorted((c.prompt_index, c.sample_index) for c in outs) == [(p, s) for p in range(3) for s in range(2)]


def test_prompts_spread_over_both_workers(service):
    before = [w["routed_requests"] for w in service._router.snapshot()]
    service.generate([[3, 4, 5]] * 8, rollout.SamplingParams(max_tokens=16, temperature=0.0))
    after = [w["routed_requests"] for w in service._router.snapshot()]
    assert all(a - b >= 2 for a, b in zip(after, before)), (before, after)


# -- weight sync -------------------------------------------------------------------------------


def test_synced_hf_params_make_every_worker_match_a_single_process_engine(service, reference, tiny_qwen3_perturbed):
    params = hf_flat(tiny_qwen3_perturbed)
    version = service.sync_weights(params)
    assert version == service.version
    assert service.status()["syncs"][-1]["buckets"] >= 3  # pack buffers were reused within the sync
    want = reference_tokens(reference, params)
    for worker in range(2):
        tokens, versions = worker_outputs(service, worker)
        assert versions == {version}
        assert tokens == want, f"worker {worker} differs from the single-process engine"


def test_a_tied_transformers_state_dict_with_its_lm_head_syncs_like_the_same_tensors_on_disk(
    service, reference, tiny_qwen3_perturbed
):
    """model.state_dict() of a tied transformers model carries lm_head.weight (the embedding)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen3_perturbed, dtype=torch.float32)
    params = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    assert "lm_head.weight" in params and model.config.tie_word_embeddings
    version = service.sync_weights(params)
    want = reference_tokens(reference, hf_flat(tiny_qwen3_perturbed))
    for worker in range(2):
        assert worker_outputs(service, worker) == (want, {version})


def test_an_lm_head_that_differs_from_a_tied_embedding_is_refused_saying_the_model_ties_them(service, tiny_qwen3):
    params = hf_flat(tiny_qwen3)
    params["lm_head.weight"] = params["model.embed_tokens.weight"] + 1
    before = service.version
    with pytest.raises(rollout.SpecMismatchError, match="ties them"):
        service.sync_weights(params)
    assert service.version == before and {w["version"] for w in service.status()["workers"]} == {before}


def test_an_engine_layout_nested_tree_syncs_as_the_next_version(service, reference, tiny_qwen3):
    params = nested(flatten_params(hf_flat(tiny_qwen3), service.spec))
    before = service.version
    assert service.sync_weights(params) == before + 1
    want = reference_tokens(reference, hf_flat(tiny_qwen3))
    for worker in range(2):
        assert worker_outputs(service, worker) == (want, {before + 1})


def test_an_hf_directory_syncs_without_the_object_store(service, reference, tiny_qwen3_perturbed, monkeypatch):
    import ray

    puts = []
    monkeypatch.setattr(ray, "put", lambda *a, **k: puts.append(a))
    version = service.sync_weights(str(tiny_qwen3_perturbed))
    assert puts == []
    want = reference_tokens(reference, hf_flat(tiny_qwen3_perturbed))
    for worker in range(2):
        assert worker_outputs(service, worker) == (want, {version})


def test_a_spec_mismatch_is_refused_before_any_transfer(service, tiny_qwen3, monkeypatch):
    import ray

    params = flatten_params(hf_flat(tiny_qwen3), service.spec)
    del params["layers.1.mlp.up_proj.kernel"]
    params["layers.9.mlp.up_proj.kernel"] = np.zeros((64, 128), np.float32)
    params["norm.weight"] = np.ones(65, np.float32)
    versions = [w["version"] for w in service.status()["workers"]]
    puts = []
    monkeypatch.setattr(ray, "put", lambda *a, **k: puts.append(a))
    with pytest.raises(rollout.SpecMismatchError) as info:
        service.sync_weights(params)
    message = str(info.value)
    assert "missing 1 path(s): layers.1.mlp.up_proj.kernel" in message
    assert "extra 1 path(s): layers.9.mlp.up_proj.kernel" in message
    assert "norm.weight: expected shape (64,), got (65,)" in message
    assert puts == []
    monkeypatch.undo()
    assert [w["version"] for w in service.status()["workers"]] == versions


def test_one_worker_failing_to_stage_aborts_the_sync_everywhere(service, tiny_qwen3, tiny_qwen3_perturbed):
    import ray

    before = service.version
    outputs = [worker_outputs(service, w) for w in range(2)]
    ray.get(service.workers[1].inject_fault.remote("stage", message="disk on fire"))
    with pytest.raises(rollout.SyncError) as info:
        service.sync_weights(hf_flat(tiny_qwen3))
    assert info.value.failures.keys() == {1}
    assert "worker 1: stage failed: InjectedFault: disk on fire" in str(info.value)
    assert service.version == before
    status = service.status()
    assert [(w["version"], w["staged_version"]) for w in status["workers"]] == [(before, None)] * 2
    assert [worker_outputs(service, w) for w in range(2)] == outputs
    # the fleet recovers: the next sync is the next version
    assert service.sync_weights(hf_flat(tiny_qwen3_perturbed)) == before + 1


def test_status_reports_workers_and_the_phases_of_recent_syncs(service, tiny_qwen3, caplog):
    with caplog.at_level(logging.INFO, logger="rollout.coordinator.sync"):
        version = service.sync_weights(hf_flat(tiny_qwen3))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "rollout.coordinator.sync"]
    phases = [line["phase"] for line in lines if line["event"] == "sync_phase" and line["version"] == version]
    assert phases == ["flatten", "check", "fetch", "pack+put", "stage", "publish", "commit"]
    status = service.status()
    assert status["version"] == version
    for worker in status["workers"]:
        assert worker["alive"] and worker["version"] == version
        for key in ("queue_depth", "active_slots", "tokens_generated", "restarts", "outstanding_tokens"):
            assert key in worker
    last = status["syncs"][-1]
    assert last["ok"] and last["version"] == version and last["nbytes"] > 0
    assert set(last["seconds"]) >= {"flatten", "pack+put", "stage", "commit"}
    assert [s["ok"] for s in status["syncs"]].count(False) >= 1  # the aborted sync is on record


def test_the_relay_fanout_can_be_changed_and_a_bad_one_is_refused(service):
    before = service.fleet_config.relay_fanout
    with pytest.raises(ValueError, match=r"relay_fanout=-1: expected an integer >= 0"):
        service.set_relay_fanout(-1)
    assert service.fleet_config.relay_fanout == before
    service.set_relay_fanout(0)
    try:
        assert service.fleet_config.relay_fanout == 0
    finally:
        service.set_relay_fanout(before)


def test_generate_in_four_threads_while_syncing_ten_times(service, tiny_qwen3, tiny_qwen3_perturbed):
    params = [hf_flat(tiny_qwen3), hf_flat(tiny_qwen3_perturbed)]
    sampling = rollout.SamplingParams(max_tokens=8, temperature=1.0, n=2, seed=3)
    stop = threading.Event()
    calls: list[tuple[int, int, list]] = []
    errors: list[BaseException] = []

    def client():
        try:
            while not stop.is_set():
                low = service.version
                outs = service.generate([[4, 5, 6], [7, 8]], sampling, timeout=120)
                calls.append((low, service.latest_version, outs))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    first = service.version
    for i in range(10):
        assert service.sync_weights(params[i % 2]) == first + i + 1
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(calls) >= 8
    seen_versions = set()
    for low, high, outs in calls:
        assert [(c.prompt_index, c.sample_index) for c in outs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for c in outs:
            assert low <= c.weight_version <= high, (low, c.weight_version, high)
            seen_versions.add(c.weight_version)
    assert len(seen_versions) > 1, "generation never overlapped a sync"


# -- failures (these kill workers; they run last) ----------------------------------------------


def test_a_worker_killed_during_generate_loses_no_request_and_repeats_none(service):
    import ray

    sampling = rollout.SamplingParams(max_tokens=96, temperature=1.0, n=2, seed=0, ignore_eos=True)
    stream = service.generate_async([[9, 10, 11]] * 12, sampling, timeout=240)
    time.sleep(1.0)
    assert any(w["inflight_requests"] for w in service._router.snapshot())
    ray.kill(service.workers[0], no_restart=False)
    seen = Counter((c.prompt_index, c.sample_index) for c in stream)
    assert seen == Counter({(p, s): 1 for p in range(12) for s in range(2)})
    assert service.wait_for_workers(timeout=120)


def test_a_worker_killed_during_a_sync_leaves_the_fleet_on_one_version(service, tiny_qwen3_perturbed):
    import ray

    assert service.wait_for_workers(timeout=120)
    before = service.version
    ray.get(service.workers[1].inject_fault.remote("stage", delay_s=3.0))
    result: dict = {}

    def sync():
        try:
            result["version"] = service.sync_weights(hf_flat(tiny_qwen3_perturbed))
        except rollout.SyncError as err:
            result["error"] = err

    thread = threading.Thread(target=sync)
    thread.start()
    time.sleep(1.0)
    ray.kill(service.workers[1], no_restart=False)
    thread.join(timeout=120)
    assert "error" in result and result["error"].failures.keys() == {1}
    assert service.wait_for_workers(timeout=120)
    versions = {worker_outputs(service, w)[1].pop() for w in range(2)}
    assert versions == {before} == {w["version"] for w in service.status()["workers"]}


def test_a_restarted_worker_catches_up_with_the_last_committed_version_before_serving(service, tiny_qwen3):
    import ray

    assert service.wait_for_workers(timeout=120)
    version = service.sync_weights(hf_flat(tiny_qwen3))
    want = worker_outputs(service, 1)
    ray.kill(service.workers[0], no_restart=False)
    assert worker_outputs(service, 0) == want  # waits for the restart; served by `version`
    status = service.status()
    assert [w["version"] for w in status["workers"]] == [version, version]
    assert status["workers"][0]["restarts"] >= 1


# -- the module-level API (its own small fleet) --------------------------------------------------


def test_module_level_api_joins_the_running_ray_and_drives_a_default_service(ray_local, tiny_qwen3, tiny_qwen3_perturbed):
    svc = rollout.init(str(tiny_qwen3), num_workers=1, devices_per_worker=1, accelerator="cpu", max_batch=4, max_seq_len=64)
    try:
        assert not svc._owns_ray
        with pytest.raises(RuntimeError, match="already called"):
            rollout.init(str(tiny_qwen3), num_workers=1, devices_per_worker=1, accelerator="cpu")
        assert rollout.sync_weights(hf_flat(tiny_qwen3_perturbed)) == 1
        outs = rollout.generate(["hello", [1, 2, 3]], sampling=rollout.SamplingParams(max_tokens=4, n=2))
        assert [(c.prompt_index, c.sample_index, c.weight_version) for c in outs] == [
            (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1)
        ]
        assert rollout.status()["workers"][0]["version"] == 1
        assert not svc.closed
    finally:
        rollout.shutdown()
    assert svc.closed
    assert ray_local.is_initialized()
    with pytest.raises(rollout.ServiceClosedError):
        rollout.status()
