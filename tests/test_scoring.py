"""Engine scoring: per-token logprobs of given completions, teacher-forced, on one weight version.

transformers' log_softmax on the same checkpoint is the reference (float32, 1 and 4 devices);
`generate`'s own logprobs are the second one (temperature 1 and a lower temperature).
"""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.scores import Scores
from rollout.weights.loader import iter_tensors

from hf_reference import hf_model

# Pairs of different lengths: two length buckets, more pairs than one forward's rows (8).
PAIRS = [([5 + i, 17, 42 + i] * (1 + i % 3), [60 + i, 61, 62 + 2 * i, 7][: 1 + i % 4]) for i in range(10)]
PAIRS.append(([3] * 14, list(range(100, 112))))  # 26 tokens: the 32-length bucket


def hf_logprobs(path, prompt: list[int], completion: list[int]) -> np.ndarray:
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = hf_model(str(path))(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1).numpy()
    n = len(prompt)
    return np.array([logp[n - 1 + i, t] for i, t in enumerate(completion)], np.float32)


@pytest.fixture(scope="module", params=[1, 4], ids=lambda n: f"{n}dev")
def engine(request, tiny_qwen3):
    devices = jax.devices()[: request.param]
    config = EngineConfig(max_batch=8, max_seq_len=128, decode_steps=4, max_prefill_batch=8)
    with Engine(tiny_qwen3, config, devices=devices) as eng:
        yield eng


def _sync(engine: Engine, path) -> int:
    version = engine.version + 1
    engine.stage(version, dict(iter_tensors(path)))
    engine.commit(version, wait=True)
    return version


def test_scores_equal_transformers_log_softmax(engine, tiny_qwen3):
    _sync(engine, tiny_qwen3)  # a known state whatever ran before in this module
    scores = engine.score([p for p, _ in PAIRS], [c for _, c in PAIRS])
    assert isinstance(scores, Scores) and len(scores) == len(PAIRS)
    for (prompt, completion), got in zip(PAIRS, scores.logprobs):
        assert got.dtype == np.float32 and got.shape == (len(completion),)
        np.testing.assert_allclose(got, hf_logprobs(tiny_qwen3, prompt, completion), atol=1e-4)


def test_scores_equal_generate_logprobs_of_the_tokens_it_sampled_at_temperature_1(engine):
    outs = engine.generate([[11, 12, 13], [40, 41]], SamplingParams(max_tokens=20, temperature=1.0, n=3, seed=7))
    scores = engine.score([list(o.prompt_token_ids) for o in outs], [list(o.token_ids) for o in outs])
    assert scores.weight_version == outs[0].weight_version
    for out, got in zip(outs, scores.logprobs):
        np.testing.assert_allclose(got, out.logprobs, atol=1e-4)


def test_temperature_scores_the_distribution_generate_samples_from(engine):
    sp = SamplingParams(max_tokens=12, temperature=0.6, seed=2, ignore_eos=True)
    out = engine.generate([[9, 8, 7, 6]], sp)[0]
    scores = engine.score([list(out.prompt_token_ids)], [list(out.token_ids)], temperature=0.6)
    np.testing.assert_allclose(scores.logprobs[0], out.logprobs, atol=1e-4)


def test_prompts_may_be_text_and_empty_completions_score_nothing(engine):
    text = "hello world"
    ids = engine.tokenizer.encode(text)
    scores = engine.score([text, ids], [[], [70, 71]])
    assert scores.logprobs[0].shape == (0,)
    np.testing.assert_allclose(scores.logprobs[1], engine.score([ids], [[70, 71]]).logprobs[0], atol=1e-6)


def test_a_committed_version_is_scored_even_before_it_is_swapped_in(engine, tiny_qwen3, tiny_qwen3_perturbed):
    """Under drain a running sequence delays the swap; score already uses (and reports) the
    committed version's weights, never the ones still serving the old sequence."""
    _sync(engine, tiny_qwen3)
    prompt, completion = PAIRS[3]
    long_run = engine.submit([1, 2, 3], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    version = engine.version + 1
    engine.stage(version, dict(iter_tensors(tiny_qwen3_perturbed)))
    engine.commit(version, "drain")
    scores = engine.score([prompt], [completion])
    long_run.result(timeout=120)
    assert scores.weight_version == version
    np.testing.assert_allclose(scores.logprobs[0], hf_logprobs(tiny_qwen3_perturbed, prompt, completion), atol=1e-4)


def test_scoring_during_syncs_always_matches_the_version_it_reports(engine, tiny_qwen3, tiny_qwen3_perturbed):
    _sync(engine, tiny_qwen3)
    prompt, completion = PAIRS[5]
    expected = {
        "base": hf_logprobs(tiny_qwen3, prompt, completion),
        "perturbed": hf_logprobs(tiny_qwen3_perturbed, prompt, completion),
    }
    which = {engine.version: "base"}
    results: list[Scores] = []
    stop = threading.Event()

    def score_loop() -> None:
        while not stop.is_set():
            results.append(engine.score([prompt], [completion]))

    thread = threading.Thread(target=score_loop)
    thread.start()
    try:
        for name in ("perturbed", "base", "perturbed"):
            path = tiny_qwen3_perturbed if name == "perturbed" else tiny_qwen3
            which[engine.version + 1] = name
            _sync(engine, path)
    finally:
        stop.set()
        thread.join()
    assert results
    for scores in results:
        np.testing.assert_allclose(scores.logprobs[0], expected[which[scores.weight_version]], atol=1e-4)


def test_weight_swaps_do_not_recompile_scoring(engine, tiny_qwen3, tiny_qwen3_perturbed):
    compiles: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    engine.score(prompts, completions)  # warm-up: compiles this call's buckets
    executables = engine.scorer.compiled_count()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for path in (tiny_qwen3_perturbed, tiny_qwen3):
            _sync(engine, path)
            engine.score(prompts, completions, temperature=0.5)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert engine.scorer.compiled_count() == executables


@pytest.mark.parametrize(
    "prompts, completions, kwargs, error, match",
    [
        ([[1, 2]], [[3], [4]], {}, ValueError, "one completion per prompt"),
        ([[1, 2]], [[3, 10**6]], {}, ValueError, "outside the vocabulary"),
        ([[]], [[3]], {}, ValueError, "empty prompt"),
        ([[1] * 100], [[2] * 29], {}, ValueError, "exceeds max_seq_len=128"),
        ([[1, 2]], ["some text"], {}, TypeError, "list of token ids"),
        ([[1, 2]], [[3.5]], {}, TypeError, "must be integers"),
        ([[1, 2]], [[3]], {"temperature": 0}, ValueError, "temperature"),
        ("a prompt", [[3]], {}, TypeError, "prompts must be a list"),
    ],
    ids=["count", "oov", "empty-prompt", "too-long", "text-completion", "float-id", "temperature", "bare-string"],
)
def test_bad_pairs_raise_before_anything_runs(engine, prompts, completions, kwargs, error, match):
    with pytest.raises(error, match=match):
        engine.score(prompts, completions, **kwargs)
