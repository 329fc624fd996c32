"""WorkerHost without Ray: the worker's side of the two-phase sync around a fake engine, with
real buckets and manifests (packed as the coordinator packs them) and a real UpdateRegistry.

Bucket "refs" here are the bucket arrays themselves; `fetch` hands them over after yielding to
the event loop, as awaiting an ObjectRef would. For the relay between nodes (rollout.relay),
a host's "object store" put is a copy only it holds, and a child asks its parent host directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect

import numpy as np
import pytest

import rollout.relay
from rollout.coordinator.registry import UpdateRegistry
from rollout.engine.backend import (
    EngineBackend,
    EngineCapabilities,
    FeatureUnavailableError,
    capabilities_of,
    engine_factory,
)
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.types import EngineClosedError, WeightSyncError
from rollout.protocol import BucketUpdate, CheckpointUpdate, RelayRole, StageReport, WorkerCalls
from rollout.relay import RelayClosed
from rollout.weights.buckets import BucketChecksumError, PackedUpdate, pack, plan_buckets
from rollout.weights.spec import spec_of_leaves
from rollout.worker.host import EARLY_SYNCS, SyncAbortedError, WorkerHost

from fake_engine import FakeEngine, FakeScoringEngine

SPEC = spec_of_leaves([(f"layers.{i}.w", (64,), "float32") for i in range(6)])  # 256 B each
BUCKET_BYTES = 512  # 3 buckets of 2 leaves


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {leaf.path: rng.standard_normal(leaf.shape).astype(np.float32) for leaf in SPEC.leaves}


def packed(version: int, seed: int | None = None) -> PackedUpdate:
    return pack(weights(version if seed is None else seed), plan_buckets(SPEC, BUCKET_BYTES), version)


def streaming(update: PackedUpdate) -> bytes:
    """The manifest a pipelined sync stages on: no checksums (each comes with its bucket)."""
    return dataclasses.replace(update.manifest, checksums=(None,) * len(update.buffers)).to_bytes()


async def fetch(ref: np.ndarray) -> np.ndarray:
    await asyncio.sleep(0)
    return ref


def make_host(
    registry: UpdateRegistry | None = None, *, timeout_s: float = 10.0, answer: bool = True,
    engine_class: type[FakeEngine] = FakeEngine, **relay,
):
    engine = engine_class(SPEC, weights(0), answer=answer)
    registry = registry or UpdateRegistry()

    async def latest_update():
        return registry.latest()

    return WorkerHost(engine, fetch=fetch, latest_update=latest_update, sync_timeout_s=timeout_s, **relay), engine


async def feed_all(host: WorkerHost, sync_id: str, update: PackedUpdate, order=None) -> list[str | None]:
    indices = order if order is not None else range(len(update.buffers))
    return [await host.feed(sync_id, i, update.buffers[i], update.manifest.checksums[i]) for i in indices]


def assert_params(engine: FakeEngine, params: dict[str, np.ndarray]) -> None:
    assert engine.params.keys() == params.keys()
    for path, array in params.items():
        np.testing.assert_array_equal(engine.params[path], array)


def test_the_fake_engine_is_an_engine_backend():
    assert isinstance(FakeEngine(SPEC, weights(0)), EngineBackend)


def test_buckets_fed_in_any_order_after_the_stage_call_are_staged_and_committed_leaf_for_leaf():
    async def run():
        host, engine = make_host()
        update = packed(1)
        stage = asyncio.ensure_future(host.stage("s1", streaming(update)))
        await asyncio.sleep(0.05)
        assert not stage.done()  # waiting for buckets, the event loop free meanwhile
        assert await feed_all(host, "s1", update, order=[2, 0, 1]) == [None] * 3
        report = await stage
        assert isinstance(report, StageReport) and report.waited_for_buckets_s > 0
        assert engine.staged_version == 1 and engine.version == 0
        assert await host.commit("s1", 1) == 1
        assert_params(engine, weights(1))

    asyncio.run(run())


def test_buckets_fed_before_their_stage_call_are_picked_up_by_it():
    async def run():
        host, engine = make_host()
        update = packed(1)
        assert await feed_all(host, "s1", update) == [None] * 3
        await asyncio.wait_for(host.stage("s1", streaming(update)), 10)
        assert engine.staged_version == 1

    asyncio.run(run())


def test_an_abort_while_the_stage_waits_for_buckets_ends_it_with_nothing_staged_and_refuses_late_buckets():
    async def run():
        host, engine = make_host()
        update = packed(1)
        stage = asyncio.ensure_future(host.stage("s1", streaming(update)))
        await feed_all(host, "s1", update, order=[0])
        await asyncio.sleep(0.05)
        assert await host.abort("s1", 1) is False  # nothing was staged yet
        with pytest.raises(SyncAbortedError, match="aborted by the coordinator"):
            await stage
        assert engine.staged_version is None
        (late,) = await feed_all(host, "s1", update, order=[1])
        assert "no longer being staged" in late

    asyncio.run(run())


def test_a_stage_call_that_arrives_after_its_abort_is_refused():
    async def run():
        host, engine = make_host()
        update = packed(1)
        await host.abort("s1", 1)
        with pytest.raises(SyncAbortedError, match="aborted before this worker staged it"):
            await host.stage("s1", streaming(update))
        assert engine.staged_version is None

    asyncio.run(run())


def test_an_abort_that_overtakes_a_running_stage_drops_what_it_staged():
    async def run():
        host, engine = make_host()
        update = packed(1)
        release = engine.hold_stage()
        await feed_all(host, "s1", update)
        stage = asyncio.ensure_future(host.stage("s1", streaming(update)))
        assert await asyncio.to_thread(engine.stage_entered.wait, 10)
        await host.abort("s1", 1)
        release.set()
        with pytest.raises(SyncAbortedError, match="aborted while this worker staged it"):
            await stage
        assert engine.staged_version is None

    asyncio.run(run())


def test_a_bucket_whose_checksum_fails_fails_the_stage_before_anything_is_staged():
    async def run():
        host, engine = make_host()
        update = packed(1)
        stage = asyncio.ensure_future(host.stage("s1", streaming(update)))
        await asyncio.sleep(0.05)  # the stage call runs first: the feeds' replies tell
        corrupted = update.buffers[1].copy()
        corrupted[5] ^= 0x10
        replies = [
            await host.feed("s1", 0, update.buffers[0], update.manifest.checksums[0]),
            await host.feed("s1", 1, corrupted, update.manifest.checksums[1]),
        ]
        assert replies[0] is None and replies[1].startswith("BucketChecksumError: bucket 1 of version 1")
        with pytest.raises(BucketChecksumError, match="the bytes were corrupted"):
            await stage
        assert engine.staged_version is None and engine.version == 0

    asyncio.run(run())


def test_a_bucket_that_never_comes_times_the_stage_out():
    async def run():
        host, engine = make_host(timeout_s=0.3)
        update = packed(1)
        stage = asyncio.ensure_future(host.stage("s1", streaming(update)))
        await feed_all(host, "s1", update, order=[0, 1])
        with pytest.raises(TimeoutError, match=r"bucket 2 of version 1 did not arrive within 0\.3s"):
            await stage
        assert engine.staged_version is None

    asyncio.run(run())


def test_early_buckets_are_kept_for_the_last_few_stage_calls_that_have_not_come():
    async def run():
        host, engine = make_host(timeout_s=0.3)
        update = packed(1)
        for k in range(EARLY_SYNCS + 1):  # the first one's buckets are dropped to bound memory
            await feed_all(host, f"s{k}", update)
        with pytest.raises(TimeoutError, match="did not arrive"):
            await host.stage("s0", streaming(update))
        await host.stage(f"s{EARLY_SYNCS}", streaming(update))
        assert engine.staged_version == 1

    asyncio.run(run())


def test_a_commit_of_an_update_this_worker_does_not_hold_catches_up_from_the_registry():
    async def run():
        registry = UpdateRegistry()
        host, engine = make_host(registry)
        update = packed(1)
        registry.publish(BucketUpdate(1, update.manifest.to_bytes(), tuple(update.buffers)))
        assert await host.commit("staged-before-a-restart", 1) == 1
        assert_params(engine, weights(1))

    asyncio.run(run())


def test_catching_up_loads_a_newer_checkpoint_update_and_leaves_an_older_one_alone(tmp_path):
    async def run():
        registry = UpdateRegistry()
        host, engine = make_host(registry)
        assert await host.catch_up() == 0  # nothing committed yet
        np.savez(tmp_path / "step-2.npz", **weights(2))
        registry.publish(CheckpointUpdate(2, str(tmp_path / "step-2.npz")))
        assert await host.catch_up() == 2
        assert_params(engine, weights(2))
        assert await host.catch_up() == 2 and engine.staged_version is None

    asyncio.run(run())


def test_a_catch_up_whose_buckets_fail_their_checksum_changes_nothing():
    async def run():
        registry = UpdateRegistry()
        host, engine = make_host(registry)
        update = packed(1)
        buffers = [b.copy() for b in update.buffers]
        buffers[0][0] ^= 0x01
        registry.publish(BucketUpdate(1, update.manifest.to_bytes(), tuple(buffers)))
        with pytest.raises(BucketChecksumError):
            await host.catch_up()
        assert engine.version == 0 and engine.staged_version is None

    asyncio.run(run())


def test_the_registry_keeps_only_newer_updates():
    registry = UpdateRegistry()
    registry.publish(CheckpointUpdate(2, "/ckpt/2"))
    with pytest.raises(ValueError, match="version 2 is not newer than the committed 2"):
        registry.publish(CheckpointUpdate(2, "/ckpt/other"))
    assert registry.latest() == CheckpointUpdate(2, "/ckpt/2")


def test_a_stage_of_an_older_version_is_refused_by_the_engine_and_nothing_is_staged():
    async def run():
        host, engine = make_host()
        for version in (1, 2):
            update = packed(version)
            await feed_all(host, f"s{version}", update)
            await host.stage(f"s{version}", streaming(update))
            await host.commit(f"s{version}", version)
        old = packed(1)
        await feed_all(host, "old", old)
        with pytest.raises(WeightSyncError, match="versions only go forward"):
            await host.stage("old", streaming(old))
        assert engine.version == 2 and engine.staged_version is None

    asyncio.run(run())


def test_generate_returns_the_engines_completions():
    async def run():
        host, _ = make_host()
        outs = await host.generate([1, 2, 3], SamplingParams(max_tokens=4, n=2), 7, True)
        assert [(c.prompt_index, c.sample_index, c.weight_version) for c in outs] == [(7, 0, 0), (7, 1, 0)]

    asyncio.run(run())


def test_a_cancelled_generate_cancels_its_request_in_the_engine():
    async def run():
        host, engine = make_host(answer=False)
        call = asyncio.ensure_future(host.generate([1, 2], SamplingParams(max_tokens=4), 0, True))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert engine.cancelled == 1 and engine.status()["queue_depth"] == 0

    asyncio.run(run())


def test_a_stream_yields_the_deltas_that_add_up_to_the_engines_completions():
    async def run():
        host, _ = make_host()
        sampling = SamplingParams(max_tokens=4, n=2)
        deltas = [d async for batch in host.generate_stream([1, 2, 3], sampling, 5, True) for d in batch]
        outs = await host.generate([1, 2, 3], sampling, 5, True)
        for out in outs:
            mine = [d for d in deltas if d.sample_index == out.sample_index]
            assert sum((d.token_ids for d in mine), ()) == out.token_ids
            assert sum((d.token_versions for d in mine), ()) == out.token_versions
            assert mine[-1].finish_reason == out.finish_reason

    asyncio.run(run())


def test_closing_a_stream_cancels_its_request_in_the_engine():
    async def run():
        host, engine = make_host(answer=False)
        stream = host.generate_stream([1, 2], SamplingParams(max_tokens=4), 0, True)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert engine.status()["queue_depth"] == 1 and engine.cancelled == 0
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await stream.aclose()
        assert engine.cancelled == 1 and engine.status()["queue_depth"] == 0

    asyncio.run(run())


def test_a_stream_whose_engine_shuts_down_raises_engine_closed():
    async def run():
        host, engine = make_host(answer=False)

        async def drain():
            return [batch async for batch in host.generate_stream([1, 2], SamplingParams(max_tokens=4), 0, True)]

        task = asyncio.ensure_future(drain())
        await asyncio.sleep(0.05)
        engine.shutdown()
        with pytest.raises(EngineClosedError):
            await task

    asyncio.run(run())


def test_score_returns_the_engines_scores_on_its_committed_version():
    async def run():
        host, engine = make_host(engine_class=FakeScoringEngine)
        update = packed(1)
        stage = asyncio.ensure_future(host.stage("s1", update.manifest.to_bytes()))
        await feed_all(host, "s1", update)
        await stage
        await host.commit("s1", 1)
        scores = await host.score([[1, 2], [3]], [[4, 5, 6], [7]], 1.0)
        assert scores.weight_version == engine.version == 1
        assert [s.tolist() for s in scores.logprobs] == [[-1.0] * 3, [-1.0]]

    asyncio.run(run())


def test_score_on_a_backend_without_score_is_refused_with_the_capabilities_reason():
    async def run():
        host, _ = make_host()
        reason = capabilities_of(host.engine).unavailable["score"]
        assert host.capabilities.unavailable["score"] == reason
        with pytest.raises(FeatureUnavailableError, match=r"^score\(\) is not available with the FakeEngine backend") as info:
            await host.score([[1, 2]], [[3]], 1.0)
        assert str(info.value) == reason

    asyncio.run(run())


def test_capabilities_of_a_backend_drop_score_only_when_it_has_no_score_method():
    assert set(capabilities_of(FakeScoringEngine(SPEC, weights(0))).unavailable) == {"lora"}  # no stage_adapter
    assert set(capabilities_of(FakeEngine(SPEC, weights(0))).unavailable) == {"score", "lora"}
    declared = EngineCapabilities(
        unavailable={"logprobs": "no logprobs here", "score": "not here either", "lora": "nor here"}
    )
    engine = FakeEngine(SPEC, weights(0))
    engine.capabilities = declared  # type: ignore[attr-defined]
    assert capabilities_of(engine) == declared  # a declared reason is kept as it is
    engine.capabilities = EngineCapabilities(unavailable={"logprobs": "no logprobs here"})  # type: ignore[attr-defined]
    assert set(capabilities_of(engine).unavailable) == {"logprobs", "score", "lora"}


def test_an_unknown_engine_name_lists_the_registered_backends():
    with pytest.raises(ValueError, match=r"engine='sglang-jaxx': expected a registered backend, one of \['native'"):
        engine_factory("sglang-jaxx")


def test_an_engine_factory_callable_is_used_as_is_and_native_names_the_jax_engine():
    def factory(model, config, devices):
        return FakeEngine(SPEC, weights(0))

    assert engine_factory(factory) is factory
    assert engine_factory("native").__name__ == "Engine"


def test_the_worker_actor_answers_every_call_of_the_contract_with_its_signature():
    from rollout.worker.actor import RolloutWorker

    def parameters(fn) -> list[str]:  # once the class was made remote, Ray adds its `_ray_trace_ctx`
        return [p for p in inspect.signature(fn).parameters if not p.startswith("_ray")]

    calls = [name for name, _ in inspect.getmembers(WorkerCalls, inspect.isfunction) if not name.startswith("_")]
    assert {"ready", "generate", "stage", "feed", "commit", "abort", "catch_up", "status"} <= set(calls)
    for name in calls:
        ours, contract = getattr(RolloutWorker, name), getattr(WorkerCalls, name)
        streaming = inspect.isasyncgenfunction(ours) and name.endswith("_stream")  # Ray streaming generators
        assert inspect.iscoroutinefunction(ours) or streaming, name
        assert parameters(ours) == parameters(contract), name


# -- the relay between nodes (rollout.relay): a parent host relays to a child host --------------


async def put_copy(buffer: np.ndarray) -> np.ndarray:
    """A relay copy in the parent's "object store": new bytes only the parent's copy refers to."""
    await asyncio.sleep(0)
    return buffer.copy()


async def ask_parent(parent: WorkerHost, sync_id: str, index: int) -> np.ndarray:
    return await parent.relay_copy(sync_id, index)


def relay_hosts(*, parent_put=put_copy, child_ask=ask_parent, timeout_s: float = 10.0):
    """(parent, child, child's engine, coordinator refs the child fetched): the parent fetches
    from the coordinator and relays; the child fetches from the parent's copies."""
    parent, _ = make_host(timeout_s=timeout_s, put_relay_copy=parent_put, relay_copy_from=ask_parent)
    from_coordinator: list[int] = []

    async def child_fetch(ref: np.ndarray) -> np.ndarray:
        if any(ref is b for b in COORDINATOR_BUFFERS):
            from_coordinator.append(1)
        return await fetch(ref)

    engine = FakeEngine(SPEC, weights(0))

    async def latest_update():
        return None

    child = WorkerHost(engine, fetch=child_fetch, latest_update=latest_update, sync_timeout_s=timeout_s,
                       put_relay_copy=put_copy, relay_copy_from=child_ask)
    return parent, child, engine, from_coordinator


COORDINATOR_BUFFERS: list[np.ndarray] = []  # the coordinator's buckets of the running test


def coordinator_update(version: int) -> PackedUpdate:
    update = packed(version)
    COORDINATOR_BUFFERS[:] = update.buffers
    return update


PARENT = RelayRole(None, relays=True)


def child_of(parent: WorkerHost) -> RelayRole:
    return RelayRole(parent=0, relays=False, parent_calls=parent)


def test_a_child_fetches_every_bucket_from_its_parents_relay_copies_even_when_it_asks_before_the_parent_stages():
    async def run():
        parent, child, engine, from_coordinator = relay_hosts()
        update = coordinator_update(1)
        child_stage = asyncio.ensure_future(child.stage("s1", streaming(update), child_of(parent)))
        assert await feed_all(child, "s1", update) == [None] * 3  # each waits for the parent's copy
        await asyncio.sleep(0.05)
        assert not child_stage.done()
        await feed_all(parent, "s1", update)
        parent_report = await parent.stage("s1", streaming(update), PARENT)
        child_report = await child_stage
        assert (parent_report.relay_copies, parent_report.relayed_buckets) == (3, 0)
        assert (child_report.relayed_buckets, child_report.relay_fallbacks) == (3, 0) and not from_coordinator
        assert await child.commit("s1", 1) == 1
        assert_params(engine, weights(1))

    asyncio.run(run())


def test_a_relay_copy_that_fails_the_coordinators_checksum_is_replaced_by_the_coordinators_copy():
    async def corrupting_put(buffer: np.ndarray) -> np.ndarray:
        copy = await put_copy(buffer)
        copy[3] ^= 0x01
        return copy

    async def run():
        parent, child, engine, from_coordinator = relay_hosts(parent_put=corrupting_put)
        update = coordinator_update(1)
        await feed_all(parent, "s1", update)
        await parent.stage("s1", streaming(update), PARENT)
        await feed_all(child, "s1", update)
        report = await child.stage("s1", streaming(update), child_of(parent))
        assert (report.relayed_buckets, report.relay_fallbacks) == (0, 3) and len(from_coordinator) == 3
        await child.commit("s1", 1)
        assert_params(engine, weights(1))

    asyncio.run(run())


def test_a_parent_that_cannot_be_reached_costs_the_child_the_coordinators_copies_not_the_sync():
    async def parent_gone(parent: WorkerHost, sync_id: str, index: int) -> np.ndarray:
        raise ConnectionError("the parent's node was lost")

    async def run():
        parent, child, engine, from_coordinator = relay_hosts(child_ask=parent_gone)
        update = coordinator_update(1)
        await feed_all(child, "s1", update)
        report = await child.stage("s1", streaming(update), child_of(parent))
        assert (report.relayed_buckets, report.relay_fallbacks) == (0, 3) and len(from_coordinator) == 3
        assert engine.staged_version == 1

    asyncio.run(run())


def test_a_parent_whose_stage_fails_sends_its_waiting_children_to_the_coordinator_at_once():
    async def run():
        parent, child, engine, _ = relay_hosts(timeout_s=30.0)
        update = coordinator_update(1)
        corrupted = update.buffers[0].copy()
        corrupted[5] ^= 0x10
        parent_stage = asyncio.ensure_future(parent.stage("s1", streaming(update), PARENT))
        await feed_all(child, "s1", update)
        child_stage = asyncio.ensure_future(child.stage("s1", streaming(update), child_of(parent)))
        await parent.feed("s1", 0, corrupted, update.manifest.checksums[0])  # the parent's bucket 0 is bad
        with pytest.raises(BucketChecksumError):
            await parent_stage
        report = await asyncio.wait_for(child_stage, 10)  # not the 30 s relay timeout
        assert report.relay_fallbacks == 3 and engine.staged_version == 1

    asyncio.run(run())


def test_after_one_failed_ask_a_child_takes_the_rest_of_the_sync_from_the_coordinator():
    asks: list[int] = []

    async def failing_ask(parent: WorkerHost, sync_id: str, index: int) -> np.ndarray:
        asks.append(index)
        raise RuntimeError("the parent restarted and never heard of this sync")

    async def run():
        parent, child, engine, from_coordinator = relay_hosts(child_ask=failing_ask)
        update = coordinator_update(1)
        child_stage = asyncio.ensure_future(child.stage("s1", streaming(update), child_of(parent)))
        await asyncio.sleep(0)  # the stage call is in: feeds now fetch one after the other
        await feed_all(child, "s1", update)
        report = await asyncio.wait_for(child_stage, 10)
        assert asks == [0]  # not once per bucket
        assert report.relay_fallbacks == 3 and len(from_coordinator) == 3 and engine.staged_version == 1

    asyncio.run(run())


def test_a_parent_that_never_hears_of_the_sync_answers_after_a_grace_and_the_child_falls_back(monkeypatch):
    monkeypatch.setattr(rollout.relay, "UNKNOWN_SYNC_GRACE_S", 0.2)  # a restarted parent: no stage call comes

    async def run():
        parent, child, engine, _ = relay_hosts(timeout_s=30.0)
        update = coordinator_update(1)
        await feed_all(child, "s1", update)
        report = await asyncio.wait_for(child.stage("s1", streaming(update), child_of(parent)), 10)
        assert report.relay_fallbacks == 3 and engine.staged_version == 1

    asyncio.run(run())


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_relay_copies_are_dropped_when_the_sync_commits_or_aborts_and_later_asks_are_refused(end):
    async def run():
        parent, _, _, _ = relay_hosts()
        update = coordinator_update(1)
        await feed_all(parent, "s1", update)
        await parent.stage("s1", streaming(update), PARENT)
        assert parent.relay.copies_held() == 3
        np.testing.assert_array_equal(await parent.relay_copy("s1", 2), update.buffers[2])
        await getattr(parent, end)("s1", 1)
        assert parent.relay.copies_held() == 0
        with pytest.raises(RelayClosed, match="ended on this worker"):
            await parent.relay_copy("s1", 0)

    asyncio.run(run())


def test_a_worker_without_a_parent_or_a_relay_role_reads_the_coordinators_copies_and_holds_none():
    async def run():
        host, _ = make_host(put_relay_copy=put_copy, relay_copy_from=ask_parent)
        update = packed(1)
        await feed_all(host, "s1", update)
        report = await host.stage("s1", streaming(update))
        assert (report.relayed_buckets, report.relay_fallbacks, report.relay_copies) == (0, 0, 0)
        assert host.relay.copies_held() == 0
        with pytest.raises(RelayClosed, match="does not relay"):
            await host.relay_copy("s1", 0)

    asyncio.run(run())
