"""Batch-invariant mode on the fleet (2 workers x 1 simulated device, the tiny dense Qwen3): a
seeded request gets bitwise the same tokens and logprobs alone on one worker and among 5 others
on the other; the fleet's `score` returns bitwise generate's logprobs; and
`score(..., return_hidden_states=[layers])` on the fleet returns bitwise what an Engine with the
same weights gives (logprobs and hidden states), checked on the driver before anything is sent.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import rollout
from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine

pytestmark = pytest.mark.ray

ENGINE = dict(max_batch=8, max_seq_len=64, decode_steps=4, max_prefill_batch=4, batch_invariant=True)
CONFIG = dict(num_workers=2, devices_per_worker=1, accelerator="cpu", bucket_bytes=64 << 10, **ENGINE)
TARGET = [7, 99, 23, 4, 150, 61, 12, 88, 5, 200, 31, 42, 17]
OTHERS = [[5, 6, 7], list(range(30, 46)), [11, 12], [201, 3, 77, 9, 120], list(range(60, 90, 3))]
SEEDED = SamplingParams(max_tokens=10, temperature=0.8, seed=11, ignore_eos=True)
PROMPTS = [TARGET, *OTHERS, [250, 249, 248], [1, 2, 3, 4]]  # 8 prompts x n=2: 16 pairs, a part per worker


@pytest.fixture(scope="module")
def service(ray_local, tiny_qwen3):
    svc = rollout.init(tiny_qwen3, **CONFIG)  # the module-level API drives this service
    try:
        yield svc
    finally:
        rollout.shutdown()


@pytest.fixture(scope="module")
def generated(service) -> list[rollout.Completion]:
    return service.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.8, seed=11, ignore_eos=True, n=2))


def _pairs(outs: list[rollout.Completion]) -> tuple[list[list[int]], list[list[int]]]:
    return [list(o.prompt_token_ids) for o in outs], [list(o.token_ids) for o in outs]


def test_a_seeded_request_is_bitwise_the_same_alone_and_among_five_others_on_the_fleet(service):
    alone = service.generate([TARGET], SEEDED, worker=0)[0]
    # the same request in one call with 5 others, all on the other worker (prefilled 4 + 2, decoded together)
    among = service.generate([*OTHERS[:2], TARGET, *OTHERS[2:]], SEEDED, worker=1)[2]
    assert len(alone.token_ids) == 10
    assert among.token_ids == alone.token_ids
    got, want = np.asarray(among.logprobs, np.float32), np.asarray(alone.logprobs, np.float32)
    assert np.array_equal(got, want), np.abs(got - want).max()


def test_fleet_score_returns_bitwise_the_logprobs_generate_returned(service, generated):
    routed = [w["routed_requests"] for w in service.status()["workers"]]
    scores = rollout.score(*_pairs(generated), temperature=SEEDED.temperature)
    after = [w["routed_requests"] for w in service.status()["workers"]]
    assert all(b > a for a, b in zip(routed, after)), "each worker scores a part"
    assert scores.hidden_states is None
    for out, got in zip(generated, scores.logprobs):
        want = np.asarray(out.logprobs, np.float32)
        assert np.array_equal(got, want), np.abs(got - want).max()


def test_fleet_score_with_hidden_states_is_bitwise_the_engines_with_the_same_weights(service, generated, tiny_qwen3):
    prompts, completions = _pairs(generated)
    layers = [0, 1, service.model_config.num_layers]
    fleet = rollout.score(prompts, completions, return_hidden_states=layers)
    engine = Engine(tiny_qwen3, EngineConfig(**ENGINE), devices=jax.devices()[:1])
    try:
        local = engine.score(prompts, completions, return_hidden_states=layers)
    finally:
        engine.shutdown()
    assert fleet.hidden_states is not None and local.hidden_states is not None
    assert len(fleet.hidden_states) == len(prompts)
    hidden = service.model_config.hidden_size
    for p, c, got, want, got_lp, want_lp in zip(
        prompts, completions, fleet.hidden_states, local.hidden_states, fleet.logprobs, local.logprobs
    ):
        assert got.dtype == np.float32 and got.shape == (len(layers), len(p) + len(c), hidden)
        assert np.array_equal(got, want), np.abs(got - want).max()
        assert np.array_equal(got_lp, want_lp)


@pytest.mark.parametrize(
    ("layers", "says"),
    [([0, 99], "must be in 0.."), ([-1], "must be in 0.."), ([1.0], "must be integers"), ([True], "must be integers"),
     ([], "non-empty list"), (2, "non-empty list")],
)
def test_fleet_score_refuses_bad_hidden_layers_on_the_driver(service, layers, says):
    routed = [w["routed_requests"] for w in service.status()["workers"]]
    with pytest.raises(ValueError, match=says):
        rollout.score([TARGET], [[5, 6]], return_hidden_states=layers)
    assert [w["routed_requests"] for w in service.status()["workers"]] == routed, "nothing was sent"


def test_the_sglang_backend_refuses_hidden_states_through_its_capabilities():
    from rollout.engine.backend import FeatureUnavailableError
    from rollout.engine.sglang import requirements

    with pytest.raises(FeatureUnavailableError, match=r"return_hidden_states.*engine='native'"):
        requirements.capabilities("0.0.2", "cpu").require("hidden_states")
