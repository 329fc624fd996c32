"""What scoring returns, and the checks of its inputs: plain Python and numpy (no jax), so the
driver validates a `score` call before anything is sent (the engine runs the same checks).

Scoring (`rollout.score`, `RolloutService.score`, `Engine.score`) returns the per-token
logprobs of given completion tokens after given prompts, teacher-forced; the forward itself is
`rollout.engine.native.scoring.Scorer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rollout.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per-token logprobs of each completion (float32, one array per pair, in input order) and
    the weight version that computed all of them."""

    logprobs: tuple[np.ndarray, ...]
    weight_version: int
    # with score(..., return_hidden_states=[layers]): per pair, the residual stream at those layers
    # (transformers' output_hidden_states indexing) at every prompt + completion position,
    # (layers, tokens, hidden) float32; None when not asked
    hidden_states: tuple[np.ndarray, ...] | None = None

    def __len__(self) -> int:
        return len(self.logprobs)


def encode_completion(completion: Any) -> list[int]:
    """A completion as token ids (a list, tuple or 1-D integer array)."""
    if isinstance(completion, np.ndarray):
        if completion.ndim != 1:
            raise TypeError(f"a completion must be a 1-D array of token ids, got shape {completion.shape}")
        completion = completion.tolist()
    if isinstance(completion, (str, bytes)) or not isinstance(completion, Sequence):
        raise TypeError(
            f"a completion must be a list of token ids, got {type(completion).__name__}; tokenize it "
            "first (text does not round-trip to the ids a model generated)"
        )
    bad = [t for t in completion if not isinstance(t, (int, np.integer)) or isinstance(t, bool)]
    if bad:
        raise TypeError(f"completion token ids must be integers; got {type(bad[0]).__name__} ({bad[0]!r})")
    return [int(t) for t in completion]


def validate_pairs(
    prompts: Sequence[list[int]], completions: Sequence[list[int]], *, vocab_size: int, max_seq_len: int
) -> None:
    """Raise ValueError for pairs a Scorer cannot run, naming the first bad pair."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"score needs one completion per prompt: got {len(prompts)} prompts and {len(completions)} completions"
        )
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        where = f"pair {index}: " if len(prompts) > 1 else ""
        if not prompt:
            raise ValueError(f"{where}empty prompt: the first completion token needs at least one token before it")
        oov = [t for t in (*prompt, *completion) if not 0 <= t < vocab_size]
        if oov:
            raise ValueError(f"{where}token id {oov[0]} is outside the vocabulary [0, {vocab_size})")
        total = len(prompt) + len(completion)
        if total > max_seq_len:
            raise ValueError(
                f"{where}prompt of {len(prompt)} + completion of {len(completion)} tokens = {total} "
                f"exceeds max_seq_len={max_seq_len}; start the engine with a larger max_seq_len"
            )


def check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected a number > 0 (1 = the model's own distribution)")
    return float(temperature)


def encode_pairs(
    encode_prompt: Callable[[Any], list[int]],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    vocab_size: int,
    max_seq_len: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts (strings, chat messages or token ids) and completions (token ids) -> validated
    token-id lists. Raises TypeError/ValueError before anything runs."""
    for name, seq in (("prompts", prompts), ("completions", completions)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray)):
            raise TypeError(f"{name} must be a list (one entry per pair), got {type(seq).__name__}")
    prompt_ids = [encode_prompt(p) for p in prompts]
    completion_ids = [encode_completion(c) for c in completions]
    validate_pairs(prompt_ids, completion_ids, vocab_size=vocab_size, max_seq_len=max_seq_len)
    return prompt_ids, completion_ids


def check_routes(
    cfg: ModelConfig, prompts: Sequence[list[int]], completions: Sequence[list[int]], routed: Sequence[Any]
) -> list[np.ndarray]:
    """Routes to replay, one (prompt + completion - 1, MoE layers, top_k) int array per pair,
    with experts in [0, num_experts); ValueError naming the pair otherwise."""
    if not cfg.is_moe:
        raise ValueError(f"routed_experts given, but {cfg.architecture} is dense (it routes nothing); pass None")
    if len(routed) != len(prompts):
        raise ValueError(f"routed_experts has {len(routed)} entries; expected one per pair ({len(prompts)})")
    out = []
    for i, (p, c, r) in enumerate(zip(prompts, completions, routed)):
        r = np.asarray(r)
        want = (len(p) + len(c) - 1, len(cfg.moe_layers), cfg.num_experts_per_tok)
        if r.shape != want or (r.size and not np.issubdtype(r.dtype, np.integer)):
            raise ValueError(
                f"routed_experts[{i}] has shape {r.shape} ({r.dtype}); expected integer experts of shape {want} "
                "(prompt + completion tokens - 1, MoE layers, top_k), as Completion.routed_experts gives them"
            )
        if r.size and (r.min() < 0 or r.max() >= cfg.num_experts):
            raise ValueError(f"routed_experts[{i}] names expert {int(r.max()) if r.max() >= cfg.num_experts else int(r.min())}; "
                             f"experts are 0..{cfg.num_experts - 1}")
        out.append(r.astype(np.int32))
    return out


def check_hidden_layers(cfg: ModelConfig, layers: Any) -> list[int]:
    """`return_hidden_states` as a list of layer indices (0: the embeddings, i: after layer i,
    num_layers: after the final norm, transformers' output_hidden_states indexing); ValueError
    saying what was expected otherwise. Dense models only.

    Checked on the driver (RolloutService.score) before any pair is sent, and by the engine."""
    if cfg.is_moe:
        raise ValueError(
            f"return_hidden_states is supported for dense models only ({cfg.architecture} is mixture-of-experts); pass None"
        )
    if isinstance(layers, np.ndarray):
        layers = layers.tolist() if layers.ndim == 1 else layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(
            f"return_hidden_states={layers!r}: expected a non-empty list of layer indices in 0..{cfg.num_layers} "
            "(0: the embeddings, i: after layer i), or None for no hidden states"
        )
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise ValueError(f"return_hidden_states: layer indices must be integers; got {type(bad[0]).__name__} ({bad[0]!r})")
    out = [int(i) for i in layers]
    outside = [i for i in out if not 0 <= i <= cfg.num_layers]
    if outside:
        raise ValueError(
            f"return_hidden_states={outside}: layer indices must be in 0..{cfg.num_layers} "
            f"(0: the embeddings, i: after layer i, {cfg.num_layers}: after the final norm)"
        )
    return out
