"""Swap policies on a mixture-of-experts model: each position's route belongs to the version that
computed it (`continue` keeps the old version's routes of the positions it computed; `recompute`
re-prefills on the new version, whose routes replace them; `drain` finishes on the old version)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.testing import make_tiny_checkpoint
from rollout.weights.loader import iter_tensors

PROMPT = [7, 8, 9, 10, 11, 12]
LONG = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True, return_routed_experts=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-swaps")
    old = make_tiny_checkpoint(root / "old", "Qwen3MoeForCausalLM", seed=0)
    new = make_tiny_checkpoint(root / "new", "Qwen3MoeForCausalLM", seed=1)
    return old, dict(iter_tensors(old)), dict(iter_tensors(new))


@pytest.fixture(scope="module")
def engine(checkpoints):
    with Engine(checkpoints[0], EngineConfig(max_batch=4, max_seq_len=256, decode_steps=2)) as eng:
        yield eng


def sync(engine: Engine, params) -> int:
    version = engine.version + 1
    engine.stage(version, params)
    engine.commit(version, wait=True)
    return version


def prompt_routes(engine: Engine) -> np.ndarray:
    """The routes of the prompt's positions on the version serving now (a fresh request)."""
    done = engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0, return_routed_experts=True))[0]
    return done.routed_experts[: len(PROMPT)]


def commit_during_generation(engine: Engine, old_params, new_params, policy: str):
    """Serve `old_params`, start a long greedy generation, commit `new_params` under `policy` once
    it has produced some tokens; returns (old version, old prompt routes, new prompt routes, the
    finished completion)."""
    old = sync(engine, old_params)
    old_routes = prompt_routes(engine)
    engine.stage(old + 1, new_params)
    start = engine.tokens_generated
    running = engine.submit(PROMPT, LONG)
    deadline = time.monotonic() + 120
    while engine.tokens_generated - start < 8:
        assert time.monotonic() < deadline and not running.done(), "generation ended before the swap"
        time.sleep(0.001)
    engine.commit(old + 1, policy)
    done = running.result(120)[0]
    return old, old_routes, prompt_routes(engine), done


def test_the_two_versions_route_the_prompt_differently(engine, checkpoints):
    """The control: without it the tests below could not tell whose routes they see."""
    sync(engine, checkpoints[1])
    a = prompt_routes(engine)
    sync(engine, checkpoints[2])
    assert not np.array_equal(a, prompt_routes(engine))


@pytest.mark.parametrize("policy", ["drain", "continue", "recompute"])
def test_each_positions_route_belongs_to_the_version_that_computed_it(engine, checkpoints, policy):
    old, old_routes, new_routes, done = commit_during_generation(engine, checkpoints[1], checkpoints[2], policy)
    routes = done.routed_experts
    assert routes.dtype == np.int16
    assert routes.shape[0] == len(PROMPT) + len(done.token_ids) - 1
    if policy == "drain":
        assert set(done.token_versions) == {old}
        np.testing.assert_array_equal(routes[: len(PROMPT)], old_routes)
        return
    k = done.token_versions.index(old + 1)
    assert 0 < k < len(done.token_ids)
    if policy == "continue":  # the prompt's KV (and routes) were computed by the old version and kept
        np.testing.assert_array_equal(routes[: len(PROMPT)], old_routes)
    else:  # recompute: prompt and generated tokens re-prefilled on the new version
        np.testing.assert_array_equal(routes[: len(PROMPT)], new_routes)
        replayed = engine.score([PROMPT], [list(done.token_ids)], routed_experts=[routes])
        assert replayed.weight_version == old + 1
        # the tokens the new version sampled: their logprobs are reproduced by replaying its routes
        np.testing.assert_allclose(replayed.logprobs[0][k:], np.asarray(done.logprobs[k:]), atol=1e-4)
