"""Scoring: per-token logprobs of given completions after given prompts, teacher-forced.

RL trainers need the log-probabilities of tokens they did not sample here: the reference model's
and the old policy's, for KL terms and importance ratios. `Scorer.score` runs each (prompt,
completion) pair as one right-padded row of a batched full-sequence forward (the same attention
as a prefill; no KV cache is touched) and reads, at every position of the completion, the
log-softmax of the logits that predicted it.

The jitted forward takes the parameter leaves as arguments, like the runner's, so weight swaps
never recompile it; shapes are bucketed (rows and length to powers of two) so the number of
executables stays small. The logits are computed over the vocabulary in chunks of positions, so a
long row never materializes a (rows, length, vocab) array. At temperature T the numbers are
`log_softmax(logits / T)`, the distribution `generate` samples from; at T = 1 they equal
`generate`'s logprobs of the tokens it sampled. `Engine.score` validates the pairs, takes one
consistent weight version and runs the Scorer on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rollout.engine.native.jit_cache import compiled_executables
from rollout.engine.native.runner import pow2_at_least
from rollout.models import forward, invariant
from rollout.models.bind import ModelDef
from rollout.models.logprobs import logprobs_of, select_layers
from rollout.models.moe import RouteRecorder

# Positions whose logits are computed at once (rows x chunk): bounds the head's activation memory
# to ~this many vocab-sized float32 rows whatever the row length.
_HEAD_POSITIONS = 256


class Scorer:
    """The jitted scoring forward of one model on one mesh; parameters come with each call."""

    def __init__(
        self, model_def: ModelDef, *, max_rows: int, max_seq_len: int, min_len: int = 16, batch_invariant: bool = False
    ):
        self.model_def = model_def
        self.max_rows = max_rows
        self.max_seq_len = max_seq_len
        self.min_len = min_len
        self.batch_invariant = batch_invariant  # rollout.models.invariant: bitwise generate's logprobs
        self._forward = jax.jit(invariant.traced(self._forward_impl, batch_invariant), static_argnames=("hidden_layers",))

    def _forward_impl(self, params, derived, tokens, lengths, temperature, given, replay, hidden_layers=()):
        """tokens (B, L) right-padded, lengths (B,) -> (B, L) float32: at column t, the logprob of
        tokens[:, t + 1] given tokens[:, : t + 1] (the last column is meaningless). given
        (B, L, MoE layers, k), replay (B, L): the experts to use where replay is True.
        `hidden_layers` (static): also the residual stream at those layers, (layers, B, L, hidden)
        (rollout.models.logprobs.select_layers); then the result is a pair."""
        model = self.model_def.bind(params)
        b, length = tokens.shape
        real = jnp.arange(length)[None, :] < lengths[:, None]
        mask = forward.causal_padding_mask(real)
        positions = jnp.broadcast_to(jnp.arange(length)[None, :], (b, length))
        recorder = RouteRecorder(self.model_def.config.num_experts_per_tok, given, replay)
        states: list[jax.Array] = []
        h = model.hidden(
            tokens,
            positions,
            lambda i, q, k, v: forward.attention(q, forward.head_major(k), forward.head_major(v), mask),
            recorder,
            **({"states": states} if hidden_layers else {}),
        )
        targets = jnp.roll(tokens, -1, axis=1)
        chunk = min(length, max(1, _HEAD_POSITIONS // b))  # both powers of two: divides length
        hc = h.reshape(b, length // chunk, chunk, -1).transpose(1, 0, 2, 3)  # (chunks, B, C, hidden)
        tc = targets.reshape(b, length // chunk, chunk).transpose(1, 0, 2)

        def one(args):
            h_chunk, t_chunk = args
            logits = model.logits(h_chunk, derived.get("head_t"))  # (B, C, V) float32
            if self.batch_invariant:  # the sampler's arithmetic, as rollout.models.token_logprobs
                return logprobs_of(logits, t_chunk, temperature)
            logits = logits / temperature
            chosen = jnp.take_along_axis(logits, t_chunk[..., None], axis=-1)[..., 0]
            return chosen - jax.nn.logsumexp(logits, axis=-1)

        out = jax.lax.map(one, (hc, tc))  # (chunks, B, C)
        table = out.transpose(1, 0, 2).reshape(b, length)
        if not hidden_layers:
            return table
        return table, select_layers(states, h, self.model_def.config.num_layers, hidden_layers)

    def score(
        self,
        params: dict[str, jax.Array],
        derived: dict[str, jax.Array],
        prompts: Sequence[list[int]],
        completions: Sequence[list[int]],
        temperature: float = 1.0,
        routes: Sequence[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Logprobs of each completion's tokens, one float32 array per pair (validated pairs).

        Pairs run `max_rows` at a time (the engine's prefill batch: the same activation memory as
        one prefill), each batch one forward on the given parameters. `routes` (validated, see
        `rollout.scores.check_routes`): the experts each pair's fed positions use (routing replay).
        For the residual stream at chosen layers beside them, see `score_with_hidden`.
        """
        return self.score_with_hidden(params, derived, prompts, completions, temperature, routes)[0]

    def score_with_hidden(
        self,
        params: dict[str, jax.Array],
        derived: dict[str, jax.Array],
        prompts: Sequence[list[int]],
        completions: Sequence[list[int]],
        temperature: float = 1.0,
        routes: Sequence[np.ndarray] | None = None,
        hidden_layers: Sequence[int] = (),
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """`score`, and per pair the residual stream at `hidden_layers` (layers, tokens, hidden)."""
        layers = tuple(int(i) for i in hidden_layers)
        cfg = self.model_def.config
        hidden: list[np.ndarray] = [np.zeros((len(layers), 0, cfg.hidden_size), np.float32)] * len(prompts)
        moe_shape = (len(cfg.moe_layers), cfg.num_experts_per_tok)
        out: list[np.ndarray] = [np.zeros((0,), np.float32)] * len(prompts)
        rows = [i for i, c in enumerate(completions) if c]  # empty completions score nothing
        # Similar lengths together, so a batch's length bucket fits most of its rows.
        rows.sort(key=lambda i: len(prompts[i]) + len(completions[i]))
        temp = jnp.asarray(temperature, jnp.float32)  # traced: no recompile per temperature
        for start in range(0, len(rows), self.max_rows):
            batch = rows[start : start + self.max_rows]
            seqs = [prompts[i] + completions[i] for i in batch]
            b = pow2_at_least(len(seqs))
            length = min(pow2_at_least(max(map(len, seqs)), self.min_len), pow2_at_least(self.max_seq_len))
            tokens = np.zeros((b, length), np.int32)
            lengths = np.zeros((b,), np.int32)
            given = np.zeros((b, length, *moe_shape), np.int32)
            replay = np.zeros((b, length), bool)
            for r, seq in enumerate(seqs):
                tokens[r, : len(seq)] = seq
                lengths[r] = len(seq)
                if routes is not None:
                    fed = len(seq) - 1
                    given[r, :fed] = routes[batch[r]]
                    replay[r, :fed] = True
            result = self._forward(params, derived, tokens, lengths, temp, given, replay, hidden_layers=layers)
            table = np.asarray(result[0] if layers else result)
            states = np.asarray(result[1]) if layers else None
            for r, i in enumerate(batch):
                first = len(prompts[i]) - 1  # the column that predicts the first completion token
                out[i] = table[r, first : first + len(completions[i])].astype(np.float32)
                if states is not None:
                    hidden[i] = states[:, r, : len(seqs[r])].astype(np.float32)
        return out, hidden

    def compiled_count(self) -> int:
        return compiled_executables(self._forward)
