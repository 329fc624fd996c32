"""Scoring on the fleet (2 workers x 2 simulated devices): `rollout.score` / `RolloutService.score`
split over workers, equal to transformers, on one weight version even while syncs commit."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import rollout
from rollout.weights.loader import iter_tensors

from test_scoring import PAIRS, hf_logprobs

pytestmark = pytest.mark.ray

CONFIG = dict(num_workers=2, devices_per_worker=2, accelerator="cpu", max_batch=8, max_seq_len=128, decode_steps=4,
              max_prefill_batch=4, bucket_bytes=64 << 10)
MANY = PAIRS * 2  # 22 pairs: two parts, one per worker


@pytest.fixture(scope="module")
def service(ray_local, tiny_qwen3):
    svc = rollout.init(tiny_qwen3, **CONFIG)  # the module-level API drives this service
    try:
        yield svc
    finally:
        rollout.shutdown()


def _expected(path) -> list[np.ndarray]:
    return [hf_logprobs(path, p, c) for p, c in MANY]


def test_fleet_scores_equal_transformers_and_use_every_worker(service, tiny_qwen3):
    service.sync_weights(dict(iter_tensors(tiny_qwen3)))
    routed = [w["routed_requests"] for w in service.status()["workers"]]
    scores = rollout.score([p for p, _ in MANY], [c for _, c in MANY])
    after = [w["routed_requests"] for w in service.status()["workers"]]
    assert scores.weight_version == service.version
    assert all(b > a for a, b in zip(routed, after)), "each worker scores a part"
    for got, want in zip(scores.logprobs, _expected(tiny_qwen3)):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_fleet_scores_equal_generate_logprobs_at_temperature_1(service):
    outs = service.generate([[11, 12, 13], "The quick brown fox"], rollout.SamplingParams(max_tokens=16, n=2, seed=4))
    scores = service.score([list(o.prompt_token_ids) for o in outs], [list(o.token_ids) for o in outs])
    assert {o.weight_version for o in outs} == {scores.weight_version}
    for out, got in zip(outs, scores.logprobs):
        np.testing.assert_allclose(got, out.logprobs, atol=1e-4)


def test_scores_during_syncs_match_the_one_version_each_call_reports(service, tiny_qwen3, tiny_qwen3_perturbed):
    service.sync_weights(dict(iter_tensors(tiny_qwen3)))
    expected = {"base": _expected(tiny_qwen3), "perturbed": _expected(tiny_qwen3_perturbed)}
    which = {service.version: "base"}
    results: list[rollout.Scores] = []
    stop = threading.Event()

    def score_loop() -> None:
        while not stop.is_set():
            results.append(service.score([p for p, _ in MANY], [c for _, c in MANY]))

    thread = threading.Thread(target=score_loop)
    thread.start()
    try:
        for name in ("perturbed", "base", "perturbed", "base"):
            which[service.version + 1] = name
            service.sync_weights(dict(iter_tensors(tiny_qwen3_perturbed if name == "perturbed" else tiny_qwen3)))
    finally:
        stop.set()
        thread.join()
    assert results
    for scores in results:
        for got, want in zip(scores.logprobs, expected[which[scores.weight_version]]):
            np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_bad_pair_is_refused_on_the_driver(service):
    with pytest.raises(ValueError, match="pair 1: token id 99999 is outside the vocabulary"):
        service.score([[1, 2], [3, 4]], [[5], [99999]])
