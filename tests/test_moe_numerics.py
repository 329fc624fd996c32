"""Qwen3-MoE numerics against transformers' Qwen3MoeForCausalLM on checkpoints it wrote, in float32.

Variants: top-2 with renormalised weights (tied, GQA 2, experts split over 4 devices), top-1
without renormalisation with a dense layer every other layer (decoder_sparse_step=2, untied,
6 experts: not divisible by 4 devices, so tensor parallelism inside experts), and top-4 with
a dense layer named in mlp_only_layers (GQA 4). On 1 and 4 devices:

- the full-sequence logits of a padded batch match transformers' (<= 1e-4 of max|ref|);
- the engine's greedy continuation is transformers' `generate(do_sample=False)` token for token,
  and its logprobs are transformers' log_softmax at the same positions (within 1e-4);
- the routed experts generate returns are transformers' router top-k at every fed position;
- scoring sampled completions with their routes replayed gives generate's logprobs.

One Engine per (variant, device count); transformers' side is computed once per variant. The
paged KV layout is checked on one variant.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.models import forward

from hf_reference import hf_greedy, hf_model
from moe_reference import hf_routes, make_moe_checkpoint

torch = pytest.importorskip("torch")

RTOL = 1e-4
LOGPROB_ATOL = 1e-4
NEW_TOKENS = 16
VARIANTS: dict[str, dict] = {
    "top2-norm-tied": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "top1-step2-untied": dict(
        num_experts=6, num_experts_per_tok=1, norm_topk_prob=False, decoder_sparse_step=2,
        tie_word_embeddings=False, num_key_value_heads=4, rope_theta=1_000_000.0,
    ),
    "top4-mlp-only-gqa4": dict(
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[1],
        num_attention_heads=8, num_key_value_heads=2, head_dim=16,
    ),
}
DEVICE_COUNTS = (1, 4)
PROMPT_LENGTHS = (5, 11, 1, 8)
PROMPTS = [[int(t) for t in np.random.default_rng(200 + i).integers(3, 440, n)] for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: make_moe_checkpoint(root / name, seed=5, **overrides) for name, overrides in VARIANTS.items()}


@functools.cache
def continuations(path: Path) -> list[list[int]]:
    return [hf_greedy(path, p, NEW_TOKENS) for p in PROMPTS]


@functools.cache
def left_padded(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt + continuation rows, left-padded: (tokens, mask, transformers' logits)."""
    rows = [p + c for p, c in zip(PROMPTS, continuations(path))]
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(tokens)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    positions = np.asarray(forward.positions_from_mask(mask))
    with torch.no_grad():
        logits = hf_model(str(path))(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
        ).logits.numpy()
    return tokens, mask, logits


@pytest.fixture(scope="module", params=[(v, n) for v in VARIANTS for n in DEVICE_COUNTS], ids=lambda c: f"{c[0]}-{c[1]}dev")
def case(request, checkpoints):
    name, n_devices = request.param
    path = checkpoints[name]
    config = EngineConfig(max_batch=len(PROMPTS), max_seq_len=64, decode_steps=4)
    with Engine(path, config, devices=jax.devices()[:n_devices]) as engine:
        yield name, path, engine


def test_full_sequence_logits_match_transformers_on_a_padded_batch(case):
    name, path, engine = case
    tokens, mask, ref = left_padded(path)
    fn = jax.jit(lambda p, t, m: forward.forward_full(engine.model_def.bind(p), t, m))
    ours = np.asarray(fn(engine.current_params(), tokens, mask))
    real = mask.astype(bool)
    err = float(np.max(np.abs(ours[real] - ref[real])) / np.max(np.abs(ref[real])))
    assert err <= RTOL, f"{name}: max|diff| / max|ref| = {err:.2e} > {RTOL}"


def test_greedy_continuation_equals_transformers_generate(case):
    _, path, engine = case
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = engine.generate(PROMPTS, greedy, return_logprobs=False, timeout=300)
    assert [list(o.token_ids) for o in outs] == continuations(path)


def test_greedy_logprobs_equal_transformers_log_softmax_at_the_same_positions(case):
    _, path, engine = case
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = engine.generate(PROMPTS, greedy, timeout=300)
    tokens, _, ref = left_padded(path)  # rows of prompt + transformers' greedy continuation
    for row, out in enumerate(outs):
        assert list(out.token_ids) == continuations(path)[row]
        # the column predicting completion token j of a left-padded row of length P + NEW_TOKENS
        cols = tokens.shape[1] - NEW_TOKENS - 1 + np.arange(NEW_TOKENS)
        logits = ref[row, cols].astype(np.float64)  # (NEW_TOKENS, vocab)
        peak = logits.max(axis=-1, keepdims=True)
        log_softmax = logits - peak - np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))
        want = log_softmax[np.arange(NEW_TOKENS), list(out.token_ids)]
        np.testing.assert_allclose(out.logprobs, want, atol=LOGPROB_ATOL, rtol=0, err_msg=f"prompt {row}")


def assert_routes_match_transformers(path: Path, outs) -> None:
    for prompt, out in zip(PROMPTS, outs):
        fed = prompt + list(out.token_ids[:-1])
        ref = hf_routes(path, fed)
        assert out.routed_experts is not None and out.routed_experts.dtype == np.int16
        assert out.routed_experts.shape == ref.shape == (len(fed), *ref.shape[1:])
        np.testing.assert_array_equal(out.routed_experts, ref)


def sample_and_replay(engine: Engine) -> None:
    """Sampled completions (temperature 1) with their routes; scoring them with the routes
    replayed gives generate's logprobs."""
    sampling = SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True, seed=7, n=2)
    outs = engine.generate(PROMPTS[:2], sampling, return_routed_experts=True, timeout=300)
    prompts = [list(o.prompt_token_ids) for o in outs]
    scores = engine.score(prompts, [list(o.token_ids) for o in outs], routed_experts=[o.routed_experts for o in outs])
    for out, logprobs in zip(outs, scores.logprobs):
        np.testing.assert_allclose(logprobs, out.logprobs, atol=LOGPROB_ATOL, rtol=0)


def test_routed_experts_equal_transformers_router_top_k(case):
    _, path, engine = case
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, return_routed_experts=True)
    assert_routes_match_transformers(path, engine.generate(PROMPTS, greedy, timeout=300))


def test_scoring_with_replayed_routes_equals_generate_logprobs(case):
    sample_and_replay(case[2])


@pytest.fixture(scope="module")
def paged(checkpoints):
    path = checkpoints["top2-norm-tied"]
    config = EngineConfig(max_batch=4, max_seq_len=64, decode_steps=4, kv_layout="paged", page_size=8)
    with Engine(path, config, devices=jax.devices()[:4]) as engine:
        yield path, engine


def test_paged_layout_routes_equal_transformers_and_replay_equals_generate(paged):
    path, engine = paged
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = engine.generate(PROMPTS, greedy, return_routed_experts=True, timeout=300)
    assert [list(o.token_ids) for o in outs] == continuations(path)
    assert_routes_match_transformers(path, outs)
    sample_and_replay(engine)
