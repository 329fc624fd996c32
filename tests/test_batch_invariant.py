"""Batch-invariant mode (rollout.models.invariant): bitwise the same numbers whatever the batch.

First the pieces, each checked on its own (XLA:CPU picks kernels by shape, so each is verified,
not assumed): the tiled matmul, the row-tiled norm and sum, the blocked attention. Then the
engine: a request among random others (random prompt lengths, sampling, row and slot), in two
engines of different max_batch, decode_steps, prefill batch and KV layout, gets bit-identical
tokens and logprobs; `score` returns them bit for bit; so does the trainer-side
`rollout.models.token_logprobs`, through which jax.grad works. Device counts: an engine on 4
devices is batch-invariant too, but its numbers differ from one device's (tested as such).
"""

from __future__ import annotations

import functools
import json
from concurrent.futures import Future

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.models import invariant
from rollout.models.invariant import BatchInvariantUnsupportedError
from rollout.models.logprobs import token_logprobs, token_logprobs_and_hidden
from rollout.testing import make_tiny_checkpoint

from hf_reference import hf_model

RNG_SEED = 25


def _row_of(fn, shapes, row, width, rng, dtype=np.float32):
    """fn's output at the row `row` holds a fixed vector, for inputs of each shape around it."""
    fixed = rng.standard_normal(width).astype(dtype)
    outs = []
    for shape in shapes:
        x = rng.standard_normal((*shape, width)).astype(dtype)
        flat = x.reshape(-1, width)
        r = row % flat.shape[0]
        flat[r] = fixed
        outs.append(np.asarray(jax.jit(fn)(x)).reshape(flat.shape[0], -1)[r])
    return outs


SHAPES = [(1,), (3,), (8,), (17,), (4, 16), (8, 128)]


@pytest.mark.parametrize("row", [0, 5, 16])
def test_invariant_matmul_gives_a_row_the_same_bits_in_any_batch(row):
    rng = np.random.default_rng(row)
    w = rng.standard_normal((256, 384)).astype(np.float32)
    outs = _row_of(lambda x: invariant.matmul(x, w), SHAPES, row, 256, rng)
    assert all(np.array_equal(o, outs[0]) for o in outs)


def test_plain_matmul_is_not_batch_invariant_which_is_why_the_mode_exists():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 1024)).astype(np.float32)
    outs = _row_of(lambda x: x @ w, [(1,), (8,)], 0, 256, rng)
    assert not np.array_equal(outs[0], outs[1])


def test_row_tiled_sum_and_norm_give_a_row_the_same_bits_in_any_batch():
    rng = np.random.default_rng(1)

    def norm(x):
        with invariant.enabled():
            return invariant.rowwise(lambda t: t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + 1e-6), x)

    def total(x):
        with invariant.enabled():
            return invariant.row_sum(x)[..., None]

    for fn, width in ((norm, 64), (total, 512)):
        outs = _row_of(fn, SHAPES, 3, width, rng)
        assert all(np.array_equal(o, outs[0]) for o in outs)


def test_blocked_attention_gives_a_query_the_same_bits_in_prefill_decode_and_any_span():
    rng = np.random.default_rng(2)
    n, kvh, h, d = 13, 2, 4, 32
    q0 = rng.standard_normal((n, h, d)).astype(np.float32)
    k0, v0 = (rng.standard_normal((kvh, n, d)).astype(np.float32) for _ in range(2))
    attend = jax.jit(invariant.attention)
    outs = []
    for b, t, s in [(1, 13, 13), (1, 16, 16), (4, 64, 64), (2, 16, 200)]:  # prefill-like: every query
        q = rng.standard_normal((b, t, h, d)).astype(np.float32)
        k, v = (rng.standard_normal((b, kvh, s, d)).astype(np.float32) for _ in range(2))
        q[-1, :n], k[-1, :, :n], v[-1, :, :n] = q0, k0, v0
        mask = np.arange(s)[None, None, :] <= np.arange(t)[None, :, None]
        mask = np.broadcast_to(mask, (b, t, s)) & (np.arange(s) < np.where(np.arange(b) == b - 1, n, s)[:, None, None])
        outs.append(np.asarray(attend(q, k, v, mask))[-1, :n])
    assert all(np.array_equal(o, outs[0]) for o in outs)
    for b, s in [(1, 64), (8, 128)]:  # decode-like: one query (position n - 1) per row
        q = rng.standard_normal((b, 1, h, d)).astype(np.float32)
        k, v = (rng.standard_normal((b, kvh, s, d)).astype(np.float32) for _ in range(2))
        q[0, 0], k[0, :, :n], v[0, :, :n] = q0[n - 1], k0, v0
        mask = np.broadcast_to(np.arange(s)[None, None, :] < n, (b, 1, s))
        assert np.array_equal(np.asarray(attend(q, k, v, mask))[0, 0], outs[0][n - 1])


# -- the engine ----------------------------------------------------------------------------------

CONFIGS = {
    "contiguous-b4-k4": EngineConfig(max_batch=4, max_seq_len=64, decode_steps=4, max_prefill_batch=4, batch_invariant=True),
    "paged-b2-k3": EngineConfig(max_batch=2, max_seq_len=64, decode_steps=3, max_prefill_batch=2, kv_layout="paged",
                                page_size=16, batch_invariant=True),
}
TARGET = [7, 99, 23, 4, 150, 61, 12, 88, 5, 200, 31, 42, 17]  # 13 tokens
SAMPLINGS = {
    "greedy": SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=10, temperature=0.8, seed=11, ignore_eos=True),
}


@pytest.fixture(scope="module")
def engines(tiny_qwen3):
    made = {name: Engine(tiny_qwen3, config, devices=jax.devices()[:1]) for name, config in CONFIGS.items()}
    yield made
    for engine in made.values():
        engine.shutdown()


def _generate_among(engine: Engine, sampling: SamplingParams, rng: np.random.Generator, others: int):
    """The target's completion when submitted at a random place among `others` random requests."""
    prompts: list[list[int]] = [list(map(int, rng.integers(3, 250, rng.integers(2, 17)))) for _ in range(others)]
    at = int(rng.integers(0, others + 1))
    prompts.insert(at, TARGET)
    futures: list[Future] = []
    for i, prompt in enumerate(prompts):
        sp = sampling if i == at else SamplingParams(
            max_tokens=int(rng.integers(1, 14)), temperature=float(rng.choice([0.0, 0.7, 1.0])),
            seed=int(rng.integers(0, 1000)), ignore_eos=True,
        )
        futures.append(engine.submit(prompt, sp))
    results = [f.result(timeout=300) for f in futures]
    target = results[at][0]
    return tuple(target.token_ids), np.asarray(target.logprobs, np.float32)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_a_request_gets_bitwise_the_same_tokens_and_logprobs_whatever_the_batch(engines, sampling):
    rng = np.random.default_rng(RNG_SEED)
    seen = []
    for engine in engines.values():
        seen.extend(_generate_among(engine, SAMPLINGS[sampling], rng, others) for others in (0, 2, 5))  # 0: alone
    tokens, logprobs = seen[0]
    assert len(tokens) == 10
    for got_tokens, got_logprobs in seen[1:]:
        assert got_tokens == tokens
        assert np.array_equal(got_logprobs, logprobs), np.abs(got_logprobs - logprobs).max()


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_score_returns_bitwise_the_logprobs_generate_returned(engines, sampling):
    sp = SAMPLINGS[sampling]
    for engine in engines.values():
        out = engine.generate([TARGET, [5, 6, 7], list(range(30, 46))], sp)
        scores = engine.score([TARGET, [5, 6, 7], list(range(30, 46))], [list(o.token_ids) for o in out],
                              temperature=sp.temperature or 1.0)
        for o, got in zip(out, scores.logprobs):
            assert np.array_equal(got, np.asarray(o.logprobs, np.float32)), np.abs(got - o.logprobs).max()


@pytest.fixture(scope="module")
def reference(engines):
    """The target's greedy completion and logprobs from the first engine, and its parameters."""
    engine = next(iter(engines.values()))
    out = engine.generate([TARGET], SAMPLINGS["greedy"])[0]
    return engine, list(out.token_ids), np.asarray(out.logprobs, np.float32)


def _trainer_batch(rng: np.random.Generator, seq: list[int], rows: int, length: int):
    tokens = rng.integers(3, 250, (rows, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, rows).astype(np.int32)
    at = int(rng.integers(0, rows))
    tokens[at, : len(seq)] = seq
    tokens[at, len(seq) :] = 0
    lengths[at] = len(seq)
    return tokens, lengths, at


def test_the_trainer_function_gives_bitwise_the_engines_logprobs_for_any_batch(reference):
    engine, completion, logprobs = reference
    params = {k: jax.device_get(v) for k, v in engine.current_params().items()}
    fn = jax.jit(functools.partial(token_logprobs, engine.model_def))
    seq = TARGET + completion
    rng = np.random.default_rng(3)
    for rows, length in [(1, len(seq)), (3, 32), (8, 64)]:
        tokens, lengths, at = _trainer_batch(rng, seq, rows, length)
        got = np.asarray(fn(params, tokens, lengths))[at, len(TARGET) - 1 : len(seq) - 1]
        assert np.array_equal(got, logprobs), np.abs(got - logprobs).max()


def test_jax_grad_goes_through_the_trainer_function_and_its_logprobs_stay_bitwise(reference):
    engine, completion, logprobs = reference
    params = {k: jax.device_get(v) for k, v in engine.current_params().items()}
    seq = TARGET + completion
    tokens, lengths, at = _trainer_batch(np.random.default_rng(4), seq, 4, 32)
    span = slice(len(TARGET) - 1, len(seq) - 1)

    def loss(p):
        lp = token_logprobs(engine.model_def, p, tokens, lengths)
        return -lp[at, span].sum(), lp

    (value, lp), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
    assert float(np.abs(np.asarray(grads["embed_tokens"])).sum()) > 0.0
    assert np.array_equal(np.asarray(lp)[at, span], logprobs)


def test_hidden_states_equal_transformers_output_hidden_states(tiny_qwen3, reference):
    import torch

    engine = reference[0]
    params = {k: jax.device_get(v) for k, v in engine.current_params().items()}
    layers = engine.model_config.num_layers
    seq = [*TARGET, 9, 10, 11]
    _, states = token_logprobs_and_hidden(engine.model_def, params, np.asarray([seq + [0] * 3], np.int32),
                               np.asarray([len(seq)], np.int32), hidden_layers=list(range(layers + 1)))
    with torch.no_grad():
        want = hf_model(str(tiny_qwen3))(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
    assert len(want) == layers + 1
    for i in range(layers + 1):
        np.testing.assert_allclose(np.asarray(states[i, 0, : len(seq)]), want[i][0].numpy(), atol=1e-4)


def test_score_returns_the_hidden_states_of_the_same_forward(tiny_qwen3, reference):
    import torch

    engine, completion, logprobs = reference
    layers = engine.model_config.num_layers
    scores = engine.score([TARGET], [completion], return_hidden_states=[0, 1, layers])
    assert np.array_equal(scores.logprobs[0], logprobs)
    assert scores.hidden_states is not None
    states = scores.hidden_states[0]
    assert states.shape == (3, len(TARGET) + len(completion), engine.model_config.hidden_size)
    with torch.no_grad():
        want = hf_model(str(tiny_qwen3))(input_ids=torch.tensor([TARGET + completion]), output_hidden_states=True)
    for got, i in zip(states, [0, 1, layers]):
        np.testing.assert_allclose(got, want.hidden_states[i][0].numpy(), atol=1e-4)


def test_four_devices_are_batch_invariant_but_not_bitwise_one_devices(tiny_qwen3, reference):
    """Tensor parallelism sums partial products across devices in another order: the mode
    guarantees bitwise equality for one device count, not across device counts."""
    _, _, one_device = reference
    config = dataclasses_replace(CONFIGS["contiguous-b4-k4"])
    with Engine(tiny_qwen3, config, devices=jax.devices()[:4]) as engine:
        rng = np.random.default_rng(RNG_SEED)
        alone = _generate_among(engine, SAMPLINGS["greedy"], rng, 0)
        among = _generate_among(engine, SAMPLINGS["greedy"], rng, 3)
    assert alone[0] == among[0] and np.array_equal(alone[1], among[1])
    assert not np.array_equal(alone[1], one_device)


def dataclasses_replace(config: EngineConfig, **changes) -> EngineConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


# -- what the mode refuses -------------------------------------------------------------------------


def test_a_moe_model_is_refused_with_the_reason(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "moe", "Qwen3MoeForCausalLM", seed=0)
    with pytest.raises(BatchInvariantUnsupportedError, match="mixture-of-experts"):
        Engine(path, EngineConfig(max_batch=2, max_seq_len=32, batch_invariant=True))


def test_the_sglang_backend_is_refused_with_the_reason():
    from rollout.coordinator.fleet import service_configs

    with pytest.raises(ValueError, match="needs engine='native'"):
        service_configs({"engine": "sglang-jax", "batch_invariant": True})


def test_the_demo_in_batch_invariant_mode_reports_a_logprob_difference_of_exactly_zero(tmp_path):
    from test_demo import run_cli

    proc = run_cli("demo", "--backend", "local", "--batch-invariant", "--steps", "2", "--group-size", "4",
                   "--quiet", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    records = [line for line in lines if line["event"] == "step"]
    assert len(records) == 2
    assert all(r["logprob_max_diff"] == 0.0 for r in records), [r["logprob_max_diff"] for r in records]


def test_serve_takes_batch_invariant_into_the_engine_config():
    from rollout.cli import build_parser
    from rollout.coordinator.fleet import service_configs
    from rollout.server.cli import service_options

    args = build_parser().parse_args(["serve", "some/model", "--batch-invariant"])
    assert service_configs(service_options(args))[1].batch_invariant
    assert not service_configs(service_options(build_parser().parse_args(["serve", "some/model"])))[1].batch_invariant
