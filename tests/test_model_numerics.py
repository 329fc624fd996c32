"""Model numerics against transformers' PyTorch Qwen on the same checkpoint, in float32.

For each model variant (Qwen3 tied / untied, GQA ratio 1 and 4, head_dim != hidden/heads, Qwen2
with q/k/v biases) on 1 and on 4 simulated devices:

- the full-sequence logits of a padded batch match transformers' logits;
- the cached path (prefill, then one decode step per token) gives the full-sequence logits;
- the engine's greedy continuation is transformers' `generate(do_sample=False)` token for token.

Bound: max|diff| <= 1e-4 * max|ref| over real tokens. Compile cost dominates the runtime, so
one Engine per (variant, device count) serves all three tests, and the transformers side
(continuations, reference logits) is computed once per variant.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams
from rollout.engine.native.engine import Engine
from rollout.models import forward
from rollout.models.sharding import cache_sharding
from rollout.testing import make_tiny_checkpoint

from hf_reference import hf_greedy, hf_model

torch = pytest.importorskip("torch")

RTOL = 1e-4
NEW_TOKENS = 32
MAX_SEQ_LEN = 128
CACHE_LEN = 64  # >= longest prompt + NEW_TOKENS; the decode attention span (static)

# Non-default rope_theta / rms_norm_eps on some variants, so a misread config field shows.
VARIANTS: dict[str, tuple[str, dict]] = {
    # heads 4, kv 2, head_dim 32 != 64 / 4
    "qwen3-tied-gqa2": ("Qwen3ForCausalLM", dict(rope_theta=1_000_000.0)),
    # GQA ratio 1 (multi-head attention), untied lm_head
    "qwen3-untied-mha": (
        "Qwen3ForCausalLM",
        dict(tie_word_embeddings=False, num_key_value_heads=4, rms_norm_eps=1e-5),
    ),
    # GQA ratio 4: heads 8, kv 2, head_dim 16 != 64 / 8
    "qwen3-tied-gqa4": (
        "Qwen3ForCausalLM",
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, rope_theta=500_000.0),
    ),
    # q/k/v biases, no qk-norm; head_dim = 64 / 4
    "qwen2-untied-bias": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1_000_000.0)),
}
DEVICE_COUNTS = (1, 4)

# Prompts of mixed lengths (a 1-token prompt among them), ids inside the tokenizer's range.
PROMPT_LENGTHS = (5, 12, 1, 9)
PROMPTS = [
    [int(t) for t in np.random.default_rng(100 + i).integers(3, 440, n)] for i, n in enumerate(PROMPT_LENGTHS)
]
# Padding side of each row of the full-sequence batch: left, right, and a row with none.
PAD_SIDES = ("left", "none", "right", "left")


@dataclasses.dataclass(frozen=True)
class Batch:
    """The padded batch of prompt + reference continuation, as both implementations see it."""

    tokens: np.ndarray  # (B, T) int
    mask: np.ndarray  # (B, T) 1 on real tokens
    positions: np.ndarray  # (B, T) positions_from_mask(mask)
    offsets: tuple[int, ...]  # column of each row's first real token


@dataclasses.dataclass(frozen=True)
class Reference:
    continuations: list[list[int]]  # transformers' greedy tokens per prompt (NEW_TOKENS each)
    batch: Batch
    logits: np.ndarray  # (B, T, vocab) transformers' logits on `batch`


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per variant, shared by both device counts."""
    root = tmp_path_factory.mktemp("numerics")
    return {
        name: make_tiny_checkpoint(root / name, architecture, seed=3, **overrides)
        for name, (architecture, overrides) in VARIANTS.items()
    }


def padded_batch(sequences: list[list[int]], sides: tuple[str, ...]) -> Batch:
    """Pad each row on its side; the "none" row must be the longest (it spans the batch)."""
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    offsets = []
    for row, (seq, side) in enumerate(zip(sequences, sides)):
        assert side != "none" or len(seq) == width, "the unpadded row must be the longest"
        start = width - len(seq) if side == "left" else 0
        tokens[row, start : start + len(seq)] = seq
        mask[row, start : start + len(seq)] = 1
        offsets.append(start)
    positions = np.asarray(forward.positions_from_mask(mask))
    return Batch(tokens, mask, positions, tuple(offsets))


@functools.cache
def reference(path: Path) -> Reference:
    continuations = [hf_greedy(path, p, NEW_TOKENS) for p in PROMPTS]
    batch = padded_batch([p + c for p, c in zip(PROMPTS, continuations)], PAD_SIDES)
    with torch.no_grad():
        out = hf_model(str(path))(
            input_ids=torch.from_numpy(batch.tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(batch.mask.astype(np.int64)),
            position_ids=torch.from_numpy(batch.positions.astype(np.int64)),
        )
    return Reference(continuations, batch, out.logits.float().numpy())


@dataclasses.dataclass
class Case:
    name: str
    path: Path
    engine: Engine

    @functools.cached_property
    def full_logits(self) -> np.ndarray:
        """Our forward_full on the reference batch, on the engine's devices and shardings."""
        batch = reference(self.path).batch
        full_logits_fn = jax.jit(lambda p, t, m: forward.forward_full(self.engine.model_def.bind(p), t, m))
        return np.asarray(full_logits_fn(self.engine.current_params(), batch.tokens, batch.mask))


@pytest.fixture(scope="module", params=[(v, n) for v in VARIANTS for n in DEVICE_COUNTS], ids=lambda c: f"{c[0]}-{c[1]}dev")
def case(request, checkpoints):
    name, n_devices = request.param
    path = checkpoints[name]
    devices = jax.devices()[:n_devices]
    assert len(devices) == n_devices, "conftest must force 4 host devices"
    config = EngineConfig(max_batch=len(PROMPTS), max_seq_len=MAX_SEQ_LEN, decode_steps=4)
    with Engine(path, config, devices=devices) as engine:
        yield Case(name, path, engine)


def real_rows(batch: Batch, logits: np.ndarray) -> np.ndarray:
    """Logits at real tokens only, concatenated over rows: (N, vocab)."""
    return logits[batch.mask.astype(bool)]


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def test_full_sequence_logits_match_transformers_on_a_padded_batch(case):
    ref = reference(case.path)
    err = rel_err(real_rows(ref.batch, case.full_logits), real_rows(ref.batch, ref.logits))
    print(f"\n{case.name} {len(case.engine.mesh.devices.flat)}dev full-sequence rel err {err:.2e}")
    assert err <= RTOL, f"max|diff| / max|ref| = {err:.2e} > {RTOL}"


@pytest.mark.parametrize("in_place", [False, True], ids=["permuted-slots", "in-place"])
def test_cached_prefill_and_decode_logits_match_the_full_sequence_forward(case, in_place):
    """Prefill the prompts into cache slots (permuted: each decode row gathers its slot's keys
    and values; in place: row i is slot i and attention reads the cache directly), then feed
    the reference continuation one token per decode step; each step's logits are the full
    forward's at that position."""
    ref = reference(case.path)
    engine = case.engine
    cfg, model_def = engine.model_config, engine.model_def
    params = engine.current_params()
    b = len(PROMPTS)

    cache = forward.init_cache(cfg, b, CACHE_LEN, model_def.dtype)
    cache = jax.device_put(cache, cache_sharding(engine.mesh, cfg))
    width = 16  # the prefill bucket: right-padded prompts
    assert max(PROMPT_LENGTHS) <= width
    tokens = np.zeros((b, width), np.int32)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, : len(prompt)] = prompt
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    # prompt row r lives in cache slot slots[r]
    slots = np.arange(b, dtype=np.int32) if in_place else np.array([2, 0, 3, 1], np.int32)

    prefill = jax.jit(lambda p, c, t, n, d, s: forward.prefill(model_def.bind(p), c, t, n, d, s))
    decode = jax.jit(
        lambda p, c, s, t, pos: forward.decode(model_def.bind(p), c, s, t, pos, CACHE_LEN, in_place=in_place)
    )
    first, cache = prefill(params, cache, tokens, lengths, slots, np.arange(b, dtype=np.int32))
    steps = [np.asarray(first)]  # steps[k][r]: logits predicting token k of row r's continuation
    for k in range(NEW_TOKENS - 1):
        fed = np.array([c[k] for c in ref.continuations], np.int32)
        logits, cache = decode(params, cache, slots, fed, lengths + k)
        steps.append(np.asarray(logits))
    cached = np.stack(steps, axis=1)  # (B, NEW_TOKENS, vocab)

    # The same positions of the full-sequence batch: prompt's last token, then each fed token.
    index = [[ref.batch.offsets[r] + lengths[r] - 1 + k for k in range(NEW_TOKENS)] for r in range(b)]
    rows = np.arange(b)[:, None]
    ours_full = case.full_logits[rows, np.array(index)]
    hf_full = ref.logits[rows, np.array(index)]
    err_ours, err_hf = rel_err(cached, ours_full), rel_err(cached, hf_full)
    print(f"\n{case.name} {len(engine.mesh.devices.flat)}dev cached vs full rel err {err_ours:.2e} (vs transformers {err_hf:.2e})")
    assert err_ours <= RTOL, f"cached vs our full forward: {err_ours:.2e} > {RTOL}"
    assert err_hf <= RTOL, f"cached vs transformers' full forward: {err_hf:.2e} > {RTOL}"


def test_greedy_continuation_equals_transformers_generate(case):
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = case.engine.generate(PROMPTS, greedy, return_logprobs=False, timeout=300)
    got = [list(o.token_ids) for o in outs]
    assert got == reference(case.path).continuations
