"""Routing replay on a fleet (2 workers x 1 simulated device, a tiny Qwen3-MoE that transformers
wrote): generate, token streams and the HTTP server return each sample's routed experts, and
`score(..., routed_experts=...)` on the fleet replays them, giving generate's logprobs.

One module-scoped fleet serves every test; the HTTP server runs on it (127.0.0.1) and is driven
by the official `openai` client with `extra_body`.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import rollout

pytest.importorskip("torch")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.ray

CONFIG = dict(num_workers=2, devices_per_worker=1, accelerator="cpu", max_batch=4, max_seq_len=128, decode_steps=4,
              max_prefill_batch=4, bucket_bytes=64 << 10)
PROMPTS = [[11, 12, 13, 14, 15], "The quick brown fox", [7, 300, 21]]
SAMPLED = rollout.SamplingParams(max_tokens=12, n=2, seed=3, return_routed_experts=True)
MOE_LAYERS, TOP_K, EXPERTS = 3, 2, 8  # tests/moe_reference.py's TINY_MOE


@pytest.fixture(scope="module")
def service(ray_local, tiny_moe):
    svc = rollout.init(tiny_moe, **CONFIG)  # the module-level API drives this service
    try:
        yield svc
    finally:
        rollout.shutdown()


@pytest.fixture(scope="module")
def generated(service) -> list[rollout.Completion]:
    return rollout.generate(PROMPTS, sampling=SAMPLED)


@pytest.fixture(scope="module")
def client(service):
    server = rollout.serve(service, port=0, served_model_name="tiny-moe")
    try:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        server.shutdown()


def _check_shape(routes: np.ndarray, prompt_len: int, completion_len: int) -> None:
    assert routes.dtype == np.int16
    assert routes.shape == (prompt_len + completion_len - 1, MOE_LAYERS, TOP_K)
    assert routes.min() >= 0 and routes.max() < EXPERTS


def test_fleet_generate_returns_the_routes_of_every_fed_position(generated):
    assert len(generated) == 2 * len(PROMPTS)
    for c in generated:
        assert c.routed_experts is not None
        _check_shape(c.routed_experts, len(c.prompt_token_ids), len(c.token_ids))
        # the top k of a position are distinct experts
        assert all(len(set(row.tolist())) == TOP_K for row in c.routed_experts.reshape(-1, TOP_K))


def test_fleet_score_with_replayed_routes_equals_generate_logprobs(service, generated):
    scores = rollout.score(
        [list(c.prompt_token_ids) for c in generated], [list(c.token_ids) for c in generated],
        routed_experts=[c.routed_experts for c in generated],
    )
    assert scores.weight_version == service.version
    for c, got in zip(generated, scores.logprobs):
        np.testing.assert_allclose(got, c.logprobs, atol=1e-4)


def test_fleet_score_splits_routes_with_their_pairs_over_both_workers(service, generated):
    many = generated * 3  # 18 pairs: two parts, one per worker
    before = [w["routed_requests"] for w in service.status()["workers"]]
    scores = service.score(
        [list(c.prompt_token_ids) for c in many], [list(c.token_ids) for c in many],
        routed_experts=[c.routed_experts for c in many],
    )
    after = [w["routed_requests"] for w in service.status()["workers"]]
    assert all(b > a for a, b in zip(before, after)), "each worker scores a part"
    for c, got in zip(many, scores.logprobs):
        np.testing.assert_allclose(got, c.logprobs, atol=1e-4)


def test_fleet_score_refuses_routes_of_the_wrong_shape_on_the_driver(service, generated):
    c = generated[0]
    with pytest.raises(ValueError, match=r"routed_experts\[0\] has shape"):
        service.score([list(c.prompt_token_ids)], [list(c.token_ids)], routed_experts=[c.routed_experts[1:]])


def test_token_stream_carries_the_routes_on_each_samples_last_delta(service):
    async def run() -> tuple[list, list[rollout.Completion]]:
        async with service.generate_stream("The quick brown fox", SAMPLED) as stream:
            batches = [deltas async for deltas in stream]
        return [d for deltas in batches for d in deltas], stream.completions()

    deltas, outs = asyncio.run(run())
    for d in deltas:  # only a sample's last delta carries its routes
        assert (d.routed_experts is not None) == (d.finish_reason is not None)
    scores = service.score(
        [list(c.prompt_token_ids) for c in outs], [list(c.token_ids) for c in outs],
        routed_experts=[c.routed_experts for c in outs],
    )
    for c, got in zip(outs, scores.logprobs):
        _check_shape(c.routed_experts, len(c.prompt_token_ids), len(c.token_ids))
        np.testing.assert_allclose(got, c.logprobs, atol=1e-4)


def test_agenerate_returns_the_routes_generate_returns(service, generated):
    outs = asyncio.run(service.agenerate(PROMPTS[0], SAMPLED))
    for got, want in zip(outs, generated[:2]):  # same seed, same weights: the same samples
        assert got.token_ids == want.token_ids
        np.testing.assert_array_equal(got.routed_experts, want.routed_experts)


def test_http_completion_returns_routed_experts_per_choice(client, service):
    resp = client.completions.create(
        model="tiny-moe", prompt=[11, 12, 13, 14, 15], max_tokens=8, n=2, seed=3, logprobs=0,
        extra_body={"return_routed_experts": True, "return_token_ids": True},
    )
    for choice in resp.choices:
        data = choice.model_dump()
        routes = np.asarray(data["routed_experts"], np.int16)
        _check_shape(routes, 5, len(data["token_ids"]))
        scores = service.score([[11, 12, 13, 14, 15]], [data["token_ids"]], routed_experts=[routes])
        np.testing.assert_allclose(scores.logprobs[0], choice.logprobs.token_logprobs, atol=1e-4)


def test_http_chat_returns_routed_experts_per_choice(client):
    resp = client.chat.completions.create(
        model="tiny-moe", messages=[{"role": "user", "content": "hello"}], max_tokens=6,
        extra_body={"return_routed_experts": True, "return_token_ids": True},
    )
    data = resp.choices[0].model_dump()
    routes = np.asarray(data["routed_experts"])
    assert routes.shape == (len(data["prompt_token_ids"]) + len(data["token_ids"]) - 1, MOE_LAYERS, TOP_K)


def test_http_stream_sends_routed_experts_in_the_last_chunk_of_a_choice(client):
    chunks = list(client.completions.create(
        model="tiny-moe", prompt="The quick brown fox", max_tokens=6, stream=True,
        extra_body={"return_routed_experts": True, "return_token_ids": True},
    ))
    choices = [ch.choices[0].model_dump() for ch in chunks if ch.choices]
    with_routes = [c for c in choices if c.get("routed_experts") is not None]
    assert len(with_routes) == 1 and with_routes[0]["finish_reason"] is not None
    tokens = [t for c in choices for t in c.get("token_ids") or []]
    prompt = next(c["prompt_token_ids"] for c in choices if c.get("prompt_token_ids"))
    assert np.asarray(with_routes[0]["routed_experts"]).shape == (len(prompt) + len(tokens) - 1, MOE_LAYERS, TOP_K)


def test_http_without_the_field_returns_no_routes(client):
    resp = client.completions.create(model="tiny-moe", prompt="The quick brown fox", max_tokens=4)
    assert "routed_experts" not in resp.choices[0].model_dump()
