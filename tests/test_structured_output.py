"""Structured output (SamplingParams.json_schema / regex / grammar) on the native engine: every
token is drawn among those the constraint allows, the text matches it, the logprobs stay the
model's, free samples beside a constrained one are unchanged, and bad constraints are refused."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from test_engine_generation import reference_logits

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.engine.native.sampling import SamplingRow, sample, stack_sampling
from rollout.engine.structured import bitmask_words

# finite: an enum and a boolean, so every sample completes well within max_tokens
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["contiguous", "paged"])
def engine(request, tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(max_batch=4, max_seq_len=128, decode_steps=4, kv_layout=request.param)) as eng:
        yield eng


def pack(allowed: np.ndarray) -> np.ndarray:
    """(rows, vocab) bool -> (rows, words) int32 bit words, token t at bit t % 32 of word t // 32."""
    rows, vocab = allowed.shape
    padded = np.zeros((rows, bitmask_words(vocab) * 32), bool)
    padded[:, :vocab] = allowed
    return np.packbits(padded, axis=-1, bitorder="little").view(np.int32)


def test_a_sample_can_follow_at_most_one_constraint_and_a_schema_dict_is_held_as_json_text():
    assert SamplingParams(json_schema={"type": "object"}).json_schema == '{"type": "object"}'
    assert SamplingParams(regex="a+").constraint == ("regex", "a+")
    with pytest.raises(ValueError, match="regex, grammar are set"):
        SamplingParams(regex="a", grammar='start: "a"')
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema="{not json")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_sampler_draws_only_allowed_tokens_and_reports_the_unmasked_logprob(temperature):
    vocab, rows = 100, 64
    logits = jax.random.normal(jax.random.key(0), (rows, vocab)) * 3
    allowed = np.zeros((rows, vocab), bool)
    allowed[:, [3, 50, 97]] = True
    allowed[0] = True  # a free row beside constrained ones
    sampling = stack_sampling([SamplingRow(temperature=temperature, seed=i) for i in range(rows)], rows)
    masked = dataclasses.replace(sampling, allowed=jnp.asarray(pack(allowed)))
    tokens, logprobs = sample(logits, masked, jnp.zeros((rows,), jnp.int32))
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    assert allowed[np.arange(rows), tokens].all()
    full = np.asarray(jax.nn.log_softmax(logits / max(temperature, 1.0), axis=-1))
    np.testing.assert_allclose(logprobs, full[np.arange(rows), tokens], atol=1e-5)
    free, _ = sample(logits, sampling, jnp.zeros((rows,), jnp.int32))
    assert tokens[0] == int(free[0])  # the free row draws as without any mask
    if temperature == 0.0:
        best = np.where(allowed, np.asarray(logits), -np.inf).argmax(-1)
        np.testing.assert_array_equal(tokens, best)
    else:
        assert len(set(tokens[1:].tolist())) > 1  # drawn, not the allowed argmax every time


def test_json_schema_samples_are_json_that_validates_and_stop_when_complete(engine):
    sp = SamplingParams(max_tokens=60, temperature=1.0, seed=3, n=3, json_schema=SCHEMA)
    for c in engine.generate(["Is it raining?", [5, 6, 7]], sp):
        assert c.finish_reason == "stop" and c.token_ids[-1] in engine.eos_ids, c.text  # ends on its EOS
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.text == json.dumps(json.loads(c.text))  # json.dumps' separators: no stray whitespace


def test_json_keys_come_out_in_the_schemas_order():
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    assert list(json.loads(SamplingParams(json_schema=schema).json_schema)["properties"]) == ["zeta", "alpha"]


def test_under_ignore_eos_a_constrained_sample_goes_on_while_its_grammar_can(engine):
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=4, regex="[a-z]+", ignore_eos=True)
    for c in engine.generate([[8, 9], [10, 11]], sp):
        assert c.finish_reason == "length" and len(c.token_ids) == 12
        assert re.fullmatch("[a-z]+", c.text) and not set(c.token_ids) & engine.eos_ids


def test_a_constrained_tokens_logprob_is_the_models_own(engine):
    out = engine.generate([[11, 12, 13]], SamplingParams(max_tokens=20, temperature=0.8, seed=5, regex="[a-z]{3,8}"))[0]
    assert re.fullmatch("[a-z]{3,8}", out.text), out.text
    logits = reference_logits(engine, out) / 0.8
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))  # over every token: unmasked
    np.testing.assert_allclose(out.logprobs, logp[np.arange(len(out.token_ids)), list(out.token_ids)], atol=1e-4)


def test_free_samples_beside_a_constrained_one_are_unchanged(engine):
    free = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = engine.generate([[21, 22, 23]], free)[0]
    together = [
        engine.submit([21, 22, 23], free),
        engine.submit([31, 32], SamplingParams(max_tokens=16, temperature=1.0, seed=2, regex="[0-9]{3}")),
    ]
    beside, constrained = (f.result(60)[0] for f in together)
    assert beside.token_ids == alone.token_ids
    assert re.fullmatch("[0-9]{3}", constrained.text) and constrained.finish_reason == "stop"


def test_a_lark_grammar_is_followed(engine):
    grammar = 'start: "call(" NAME ")"\nNAME: /[a-z]+/'
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=30, temperature=0.0, grammar=grammar))[0]
    assert out.finish_reason in ("stop", "length")
    assert out.text.startswith("call(") and re.fullmatch(r"call\([a-z]*\)?", out.text), out.text


def test_a_constraint_that_does_not_compile_is_refused_before_anything_is_queued(engine):
    before = engine.tokens_generated
    with pytest.raises(ValueError, match="regex could not be compiled"):
        engine.generate(["a", "b"], SamplingParams(max_tokens=4, regex="(unclosed"))
    with pytest.raises(ValueError, match="json_schema could not be compiled"):
        engine.submit("a", SamplingParams(max_tokens=4, json_schema={"type": "no-such-type"}))
    assert engine.tokens_generated == before


def test_a_sample_continued_after_its_first_tokens_keeps_its_constraint(engine):
    # what the fleet sends when a worker dies mid-sample: prompt + delivered tokens, constraint_prefix
    prompt, sp = [5, 6, 7], SamplingParams(max_tokens=40, temperature=0.0, json_schema=SCHEMA)
    whole = engine.generate([prompt], sp)[0]
    k = 5
    rest = engine.generate(
        [prompt + list(whole.token_ids[:k])], dataclasses.replace(sp, max_tokens=40 - k, constraint_prefix=k)
    )[0]
    assert whole.token_ids[:k] + rest.token_ids == whole.token_ids
    assert rest.finish_reason == whole.finish_reason == "stop"


def test_a_constraint_prefix_the_constraint_does_not_accept_is_refused(engine):
    not_json = engine.tokenizer.encode("hello")
    with pytest.raises(ValueError, match="do not follow its constraint"):
        engine.generate([not_json], SamplingParams(max_tokens=4, json_schema=SCHEMA, constraint_prefix=len(not_json)))
    with pytest.raises(ValueError, match="longer than the prompt"):
        engine.generate([[1, 2]], SamplingParams(max_tokens=4, regex="a+", constraint_prefix=3))
    with pytest.raises(ValueError, match="constraint_prefix"):
        SamplingParams(constraint_prefix=2)  # without a constraint
