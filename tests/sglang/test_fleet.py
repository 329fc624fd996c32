"""The seed flow on the sglang-jax backend: a Ray fleet of sglang-jax workers started from shapes
only, real weights synced in three forms, a chat reply; and trainer_stub.dummy_then_real."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import rollout
from tests.sglang.helpers import greedy, hf_flat, trainer_pytree

pytestmark = [pytest.mark.sglang, pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def fleet(ray_local, ckpt_a):
    svc = rollout.RolloutService(
        str(ckpt_a), num_workers=1, devices_per_worker=1, engine="sglang-jax", load_format="dummy",
        max_batch=4, max_seq_len=128, accelerator="cpu", bucket_bytes=64 << 10,
    )
    yield svc
    svc.shutdown()


def _tokens(fleet, refs):
    outs = fleet.generate(refs["prompts"], greedy(refs["max_new_tokens"]), return_logprobs=False)
    return [list(c.token_ids) for c in outs], {c.weight_version for c in outs}


def test_fleet_syncs_every_form_and_serves_each_version(fleet, refs, ckpt_a, ckpt_b):
    assert fleet.sync_weights(str(ckpt_a)) == 1
    assert _tokens(fleet, refs) == (refs["greedy"]["a"], {1})
    assert fleet.sync_weights(hf_flat(ckpt_b)) == 2
    assert _tokens(fleet, refs) == (refs["greedy"]["b"], {2})
    assert fleet.sync_weights(trainer_pytree(ckpt_a)) == 3
    assert _tokens(fleet, refs) == (refs["greedy"]["a"], {3})
    reply = fleet.generate([[{"role": "user", "content": "你是谁"}]], greedy(16), return_logprobs=False)[0]
    assert len(reply.token_ids) == 16 and reply.weight_version == 3
    worker = fleet.status()["workers"][0]
    assert worker["version"] == 3


def test_fleet_refuses_logprobs_on_the_caller(fleet, refs):
    from rollout.engine.backend import FeatureUnavailableError

    with pytest.raises(FeatureUnavailableError, match=r"return_logprobs=True is not available.*return_logprobs=False"):
        fleet.generate(refs["prompts"][:1], greedy(4))
    assert len(fleet.generate(refs["prompts"][:1], greedy(4), return_logprobs=False)[0].token_ids) == 4


def test_fleet_refuses_score_on_the_caller_from_the_backends_capabilities(fleet, refs):
    from rollout.engine.backend import FeatureUnavailableError

    assert set(fleet.capabilities.unavailable) == {
        "logprobs", "score", "routed_experts", "lora", "top_logprobs", "hidden_states", "structured_output"
    }
    with pytest.raises(FeatureUnavailableError, match=r"score\(\) is not available with engine='sglang-jax'"):
        fleet.score(refs["prompts"][:1], [[1, 2, 3]])


def test_fleet_streams_deltas_that_add_up_to_the_completion(fleet, refs):
    import asyncio

    prompt = refs["prompts"][0]
    want = fleet.generate([prompt], greedy(24), return_logprobs=False)[0]

    async def stream() -> list:
        async with fleet.generate_stream(prompt, greedy(24), return_logprobs=False) as deltas:
            return [d async for batch in deltas for d in batch]

    deltas = asyncio.run(stream())
    assert [t for d in deltas for t in d.token_ids] == list(want.token_ids)
    assert "".join(d.text for d in deltas) == want.text
    assert deltas[-1].finish_reason == want.finish_reason
    assert {v for d in deltas for v in d.token_versions} == {want.weight_version}
    completions = asyncio.run(fleet.agenerate(prompt, greedy(8), return_logprobs=False))
    assert list(completions[0].token_ids) == list(want.token_ids[:8])


def test_fleet_refuses_a_mismatched_update_and_keeps_its_version(fleet, ckpt_a):
    version = fleet.version
    bad = hf_flat(ckpt_a)
    bad.pop("model.norm.weight")
    with pytest.raises(rollout.SpecMismatchError, match="missing 1 path"):
        fleet.sync_weights(bad)
    assert fleet.version == version


def test_dummy_then_real_prints_one_json_line_per_phase(ckpt_a):
    run = subprocess.run(
        [sys.executable, "-m", "trainer_stub.dummy_then_real", "--engine", "sglang-jax", "--model", str(ckpt_a),
         "--devices", "1", "--max-tokens", "16", "--max-seq-len", "128"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["phase"] for r in lines] == ["engine_ready_dummy", "weights_swapped", "generate_result"]
    ready, swapped, result = lines
    assert ready["engine"] == "sglang-jax" and ready["version"] == 0
    assert swapped["version"] == 1 and swapped["leaves_unchanged"] and swapped["shapes_unchanged"]
    assert result["weight_version"] == 1 and not result["recompiled"] and result["token_ids"]


# -- a worker that dies (kills the fleet's only worker: runs last) ------------------------------


def test_a_restarted_worker_comes_back_at_the_committed_version_before_serving(fleet, refs, ckpt_b):
    """The fleet's one restart path (Ray restarts the actor, the worker catches up with the last
    committed update before it reports ready) brings an sglang-jax worker back on the committed
    weights: same greedy tokens as before the kill, same version, nothing served by dummy weights."""
    import ray

    version = fleet.sync_weights(hf_flat(ckpt_b))
    before = _tokens(fleet, refs)
    assert before == (refs["greedy"]["b"], {version})
    restarts = fleet.status()["workers"][0]["restarts"]
    ray.kill(fleet.workers[0], no_restart=False)
    after = _tokens(fleet, refs)  # waits for the restart; must be served by `version`
    assert after == before
    worker = fleet.status()["workers"][0]
    assert worker["restarts"] == restarts + 1
    assert worker["version"] == worker["serving_version"] == version and fleet.version == version
    assert worker["backend"] == "sglang-jax"
