"""Per-slot sampling values and the on-device sampler.

Logprobs are those of the distribution actually sampled from: log_softmax(logits / temperature),
before top-k/top-p truncation and before a structured-output mask (`SlotSampling.allowed`, which
only restricts the draw); at temperature 0 (greedy), the raw log_softmax. Sampling works
on the logits shifted by their maximum *before* the division by the temperature
(`shifted_logits`), so tokens and logprobs stay right, and logprobs finite and <= 0, at any
temperature > 0: as the temperature goes to 0 the tokens become the greedy ones and the logprob
of each goes to 0 (the sampled distribution becomes a point mass; -log(k) for a k-way exact
tie). A positive temperature below float32's smallest normal number (~1.18e-38) is served as
that number: devices flush smaller (subnormal) float32 values to zero, which would silently
turn the request greedy on some devices and not on others.

Tokens are drawn by inverse transform sampling (`inverse_cdf`): two uniform numbers per row,
from a key derived from (seed, sample index, absolute position), so a seeded request gets the
same tokens for the same weights whatever else is in the batch.

Top-k alternatives (SamplingParams.top_logprobs): `sample_top` also returns the most likely
tokens of every row and their logprobs, `jax.lax.top_k` over the same log-softmax the sampled
token's logprob is read from. How many is `SlotSampling.top_n`, a static (meta) field: 0 when no
row asks (the step compiles without them, at no cost), else MAX_TOP_LOGPROBS for every row (one
more compiled variant, not one per N); each sample keeps the N it asked for. Likewise a batch
with a structured-output row carries `allowed` (one more variant) and a batch without does not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rollout.engine.alternatives import MAX_TOP_LOGPROBS
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.structured import TokenConstraint, bitmask_rows
from rollout.models import invariant

# The smallest normal float32: positive temperatures below it are served as it (see above).
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    """One slot's sampling values on the host: a row of `SlotSampling`. The default is the
    greedy row that idle slots hold."""

    temperature: float = 0.0  # 0 = greedy, else >= MIN_TEMPERATURE
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    sample_index: int = 0
    top_logprobs: int = 0  # alternatives this row's sample keeps (the step computes top_n of them)

    @classmethod
    def of(cls, sampling: SamplingParams, seed: int, sample_index: int) -> SamplingRow:
        temperature = float(sampling.temperature)
        if 0.0 < temperature < MIN_TEMPERATURE:
            temperature = MIN_TEMPERATURE
        return cls(
            temperature, int(sampling.top_k), float(sampling.top_p), seed, sample_index, int(sampling.top_logprobs)
        )


IDLE_ROW = SamplingRow()


@dataclasses.dataclass(frozen=True)
class SlotSampling:
    """Per-slot sampling arrays fed to the jitted step (all shape (slots,))."""

    temperature: jax.Array  # float32
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32
    seed: jax.Array  # int32
    sample_index: jax.Array  # int32
    top_n: int = 0  # static: alternatives per row that `sample_top` computes (0 or MAX_TOP_LOGPROBS)
    # structured output: (slots, ceil(vocab / 32)) int32, token t allowed where bit t % 32 of word
    # t // 32 is set (rollout.engine.structured); None (no leaf): every token allowed
    allowed: jax.Array | None = None


jax.tree_util.register_dataclass(
    SlotSampling,
    data_fields=["temperature", "top_k", "top_p", "seed", "sample_index", "allowed"],
    meta_fields=["top_n"],
)


def sample_keys(seed: jax.Array, sample_index: jax.Array, position: jax.Array) -> jax.Array:
    """One PRNG key per row from (seed, sample index, absolute position of the new token)."""

    def one(s: jax.Array, i: jax.Array, p: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), p)

    return jax.vmap(one)(seed, sample_index, position)


def sample(logits: jax.Array, params: SlotSampling, position: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits (S, V) float32, position (S,) of the token being sampled -> (tokens, logprobs) (S,)."""
    tokens, logprobs, _, _ = _sample(logits, params, position)
    return tokens, logprobs


def _sample(
    logits: jax.Array, params: SlotSampling, position: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`sample`, and the shifted, temperature-scaled logits (S, V) and their log-sum-exp (S,)
    it took the logprobs from (what `sample_top` reads its alternatives off)."""
    greedy = params.temperature <= 0.0
    temp = jnp.where(greedy, 1.0, params.temperature)[:, None]
    scaled = shifted_logits(logits, temp)
    weights = jnp.exp(scaled)  # the draw's weights before truncation, and the softmax's terms
    # the draw (or argmax) sees only the allowed tokens; logprobs stay those of the full softmax
    choice, choice_weights = scaled, weights
    if params.allowed is not None:
        choice = shifted_logits(jnp.where(unpack_bitmask(params.allowed, logits.shape[-1]), logits, -jnp.inf), temp)
        choice_weights = jnp.exp(choice)

    def draw(choice: jax.Array) -> jax.Array:
        needs_truncation = jnp.any(~greedy & ((params.top_k > 0) | (params.top_p < 1.0)))
        truncated = jax.lax.cond(needs_truncation, _truncate, lambda s, *_: s, choice, params.top_k, params.top_p)
        keys = sample_keys(params.seed, params.sample_index, position)
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(keys)  # (S, 2)
        # A greedy row draws from a point mass on its maxima (exactly 0 in `choice`) with u = 0:
        # the first of them, as first_argmax takes.
        kept = jnp.where(truncated == -jnp.inf, 0.0, choice_weights)  # exp(truncated): truncation only masks
        point_mass = (choice == 0.0).astype(jnp.float32)
        return inverse_cdf(jnp.where(greedy[:, None], point_mass, kept), jnp.where(greedy[:, None], 0.0, uniform))

    # An all-greedy batch skips the draw and the sort entirely.
    tokens = jax.lax.cond(jnp.any(~greedy), draw, first_argmax, choice)
    # log_softmax(scaled) at the chosen token: the distribution sampled from, untruncated and
    # unmasked (a constrained sample's logprob is the model's, as a trainer's forward gives it).
    picked = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    log_total = jnp.log(invariant.row_sum(weights))  # per row in batch-invariant mode
    return tokens, picked - log_total, scaled, log_total


def sample_top(
    logits: jax.Array, params: SlotSampling, position: jax.Array
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """`sample`, plus the `params.top_n` most likely tokens of each row and their logprobs,
    ((S, top_n) int32, (S, top_n) float32), most likely first: log_softmax(shifted_logits) as
    `sample` computes it for the sampled token (in one jitted step XLA computes it once).
    With top_n == 0 they are empty arrays and nothing more is computed."""
    tokens, logprobs, scaled, log_total = _sample(logits, params, position)
    rows = logits.shape[0]
    if params.top_n == 0:
        return tokens, logprobs, (jnp.zeros((rows, 0), jnp.int32), jnp.zeros((rows, 0), jnp.float32))
    top_values, top_ids = jax.lax.top_k(scaled, min(params.top_n, logits.shape[-1]))
    return tokens, logprobs, (top_ids.astype(jnp.int32), top_values - log_total[:, None])


def unpack_bitmask(words: jax.Array, vocab: int) -> jax.Array:
    """(S, W) int32 bit words -> (S, vocab) bool: token t is bit t % 32 of word t // 32.

    >>> unpack_bitmask(jnp.array([[0b101]], jnp.int32), 4).tolist()
    [[True, False, True, False]]
    """
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # (S, W, 32), arithmetic shift: bit 31 too
    return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def shifted_logits(logits: jax.Array, temp: jax.Array) -> jax.Array:
    """(logits - their row maximum) / temp: logits / temp up to a per-row constant, which
    neither the draw nor log_softmax sees, but <= 0 and exactly 0 at the maximum for any
    temp > 0. So exp() never overflows, the softmax sum is in [1, V], logprobs are finite and
    <= 0, and the maximum stays exactly 0 (an argmax) wherever XLA recomputes the division.

    Dividing the raw logits instead gave +-inf logprobs from temp ~1e-8 down: XLA:CPU
    recomputes `logits / temp` as a multiplication inside each fusion, and at magnitudes of 1e9
    and more the copies differ by more than exp() can take; below ~1e-37 logits / temp
    overflows to +-inf and the draw picks the first such token.
    """
    return (logits - jnp.max(logits, axis=-1, keepdims=True)) / temp  # (S, V)


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the maximum) as int32.

    Two plain reductions instead of XLA's variadic (value, index) reduce, which XLA:CPU does not
    vectorize: ~5x faster on a (16, 32000) row block, a tenth of a decode step at batch 16.
    A row holding NaN gets the last index (jnp.argmax would point at the NaN).
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.minimum(_first_true(x == top), x.shape[-1] - 1)


def _first_true(mask: jax.Array) -> jax.Array:
    """Per row, the first index where `mask` (S, n) holds, as int32; n where it holds nowhere."""
    n = mask.shape[-1]
    return jnp.min(jnp.where(mask, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def cdf_block(vocab: int) -> int:
    """inverse_cdf's block of tokens: about sqrt(vocab), a multiple of 128, so that both of its
    cumulative sums (over the block totals, then over one block) stay near vocab per row."""
    return 128 * max(1, math.ceil(math.sqrt(vocab) / 128))


def inverse_cdf(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """One draw per row from the distribution proportional to `weights` (S, V) >= 0, by
    inverse transform sampling in two levels: `uniform[:, 0]` (in [0, 1)) picks a block of
    `cdf_block(V)` tokens in proportion to its total weight, `uniform[:, 1]` a token within it
    in proportion to its weight. Returns int32 (S,).

    Two uniforms per row instead of the Gumbel-max trick's V noise values (at 128 rows x 32000
    tokens the noise alone took ~20 ms of a ~110 ms decode step on CPU), and each level's
    float32 uniform resolves its own level, so the draw is exact to ~1e-7 of a block's mass
    rather than of the whole vocabulary's. A zero weight is never drawn, whatever the rounding:
    each level takes the first entry of positive weight whose cumulative sum exceeds its
    target, or its last entry of positive weight if rounding left none above. Uniforms of 0
    take the first token of positive weight. A row whose total is not finite and positive (NaN
    logits) gets the last token, as `first_argmax` gives it.
    """
    rows, vocab = weights.shape
    size = cdf_block(vocab)
    nblocks = -(-vocab // size)
    blocks = jnp.pad(weights, ((0, 0), (0, nblocks * size - vocab))).reshape(rows, nblocks, size)
    block_sums = jnp.sum(blocks, axis=-1)  # (S, nblocks)
    total = jnp.sum(block_sums, axis=-1)
    block = _first_above(_cumsum(block_sums), uniform[:, 0] * total, block_sums > 0.0)
    inner = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # (S, size)
    mass = jnp.take_along_axis(block_sums, block[:, None], axis=-1)[:, 0]
    token = block * size + _first_above(_cumsum(inner), uniform[:, 1] * mass, inner > 0.0)
    return jnp.where(jnp.isfinite(total) & (total > 0.0), token, vocab - 1).astype(jnp.int32)


def _first_above(cum: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
    """Per row, the first index i with positive[i] and cum[i] > target; the last positive index
    when rounding left none above the target (0 when there is none)."""
    first = _first_true(positive & (cum > target[:, None]))
    last = jnp.max(jnp.where(positive, jnp.arange(cum.shape[-1], dtype=jnp.int32), 0), axis=-1)
    return jnp.where(first < cum.shape[-1], first, last)


def _cumsum(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over the last axis as a product with a triangular matrix of ones,
    in float32 on every platform: XLA:CPU runs jnp.cumsum as a reduce-window, ~12 ms per decode
    step on 64 rows of 250 block totals, against well under 1 ms for the product."""
    n = x.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), x.dtype))
    return jnp.dot(x, upper, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _truncate(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask logits outside top-k, then outside the top-p nucleus of what remains."""
    vocab = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # (S, V) descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # (S, 1)
    desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest prefix whose mass reaches top_p; top_p >= 1 keeps every token, also those
    # whose float32 mass_before rounds to 1.
    keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    pth = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def stack_sampling(rows: Sequence[SamplingRow], slots: int) -> SlotSampling:
    """Host rows padded with idle (greedy) rows to `slots` rows, as device arrays."""
    rows = list(rows) + [IDLE_ROW] * (slots - len(rows))
    top_n = MAX_TOP_LOGPROBS if any(r.top_logprobs > 0 for r in rows) else 0
    return SlotSampling(
        temperature=jnp.asarray([r.temperature for r in rows], jnp.float32),
        top_k=jnp.asarray([r.top_k for r in rows], jnp.int32),
        top_p=jnp.asarray([r.top_p for r in rows], jnp.float32),
        seed=jnp.asarray([r.seed for r in rows], jnp.int32),
        sample_index=jnp.asarray([r.sample_index for r in rows], jnp.int32),
        top_n=top_n,
    )


def with_masks(sampling: SlotSampling, constraints: Sequence[TokenConstraint | None]) -> SlotSampling:
    """`sampling` with the structured-output masks of the constrained rows (row i:
    constraints[i]), or as it is when none is (no `allowed` leaf: the unconstrained executable)."""
    mask = bitmask_rows(constraints, int(sampling.temperature.shape[0]))
    return sampling if mask is None else dataclasses.replace(sampling, allowed=jnp.asarray(mask))


def call_steps(sampling: SlotSampling, decode_steps: int) -> int:
    """Decode steps for a call with these rows: 1 when a row carries a structured-output mask
    (it holds for one token; the matcher on the host makes the next), else `decode_steps`."""
    return 1 if sampling.allowed is not None else decode_steps
