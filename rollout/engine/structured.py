"""Structured output: the tokens a sample may take next under its JSON schema, regex or grammar.

The constraint of `SamplingParams` (json_schema / regex / grammar) is compiled by llguidance
(guidance-ai/llguidance: a Rust matcher over the checkpoint's own tokenizer that computes the
allowed-token mask of a state on the host; a library rather than our own code, since mask
computation over a 150k-token byte-level vocabulary is the whole difficulty). Each sample of a
constrained request holds its own `TokenConstraint`:

- before a forward samples its next token, the scheduler asks every constrained row for its
  mask (`bitmask_rows`): (rows, ceil(vocab / 32)) int32 bits, token t allowed where bit
  t % 32 of word t // 32 is set; unconstrained rows allow every token;
- the native sampler (rollout.engine.native.sampling, `with_masks`) draws only among allowed
  tokens (greedy takes the best allowed one), and reports the token's logprob under the
  model's unmasked distribution: what a trainer's forward computes for it;
- the accepted token advances the matcher (`accept`); a sample whose grammar is complete
  finishes "stop" on its EOS token (see `TokenConstraint` for ignore_eos).

A mask holds for one token, so a decode call with a constrained row runs one step instead of
`decode_steps` (rollout.engine.native.sampling.call_steps): free samples in the same call
advance one token per call too, at the cost of more host round trips (`rollout bench
structured` measures it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rollout.engine.sampling_params import SamplingParams
    from rollout.tokenizer import Tokenizer

log = logging.getLogger("rollout.engine")

# JSON as json.dumps writes it (", " and ": ", no other whitespace) unless the schema's own
# "x-guidance" options say otherwise: with any whitespace allowed, a sampled policy can spend
# its whole budget on newlines inside braces (seen on random weights), and trainers see one
# canonical layout.
JSON_DEFAULTS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # JsonCompileOptions


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row's mask: one bit per token id.

    >>> bitmask_words(32), bitmask_words(33), bitmask_words(151936)
    (1, 2, 4748)
    """
    return -(-vocab_size // 32)


class TokenConstraint:
    """One sample's matcher: which tokens it may take next, advanced by each accepted token.

    EOS: the grammar allows the checkpoint's EOS ids where it may end. With `ignore_eos` they
    are masked out while any other token is allowed (the sample goes on), and a complete grammar
    ends the sample at once; otherwise a complete grammar leaves EOS as the only choice, so the
    sample ends on its EOS token (with its logprob), as an unconstrained one does.
    """

    def __init__(self, matcher: Any, words: int, eos: frozenset[int], ignore_eos: bool):
        self.matcher = matcher
        self.words = words  # int32 words of its mask rows (`bitmask_words` of the mask's vocab)
        self.eos, self.ignore_eos = eos, ignore_eos

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed-token bits of the next position into `row` (words,) int32."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, row[None], 0)
        self.mask_eos(row)

    def mask_eos(self, row: np.ndarray) -> None:
        """Under ignore_eos, clear the EOS bits of a filled `row` unless nothing else is allowed."""
        if not self.ignore_eos or not self.eos:
            return
        kept = row.copy()
        for t in self.eos:
            kept[t // 32] &= ~np.int32(np.uint32(1 << (t % 32)).view(np.int32))
        if kept.any():
            row[:] = kept

    def accept(self, token: int) -> str | None:
        """Advance past `token`: "stop" when the sample ends here (its grammar is complete and
        no EOS is to follow: the token was EOS, or EOS is ignored), "abort" when the token broke
        the constraint (the mask rules that out: logged as an error), else None."""
        if not self.matcher.consume_token(token):
            log.error("structured output: token %d was refused by its constraint: %s", token, self.matcher.get_error())
            return "abort"
        if self.matcher.is_stopped() and (self.ignore_eos or not self.eos or token in self.eos):
            return "stop"
        return None

    def copy(self) -> TokenConstraint:
        return TokenConstraint(self.matcher.deep_copy(), self.words, self.eos, self.ignore_eos)

    def start(self, prompt_ids: Sequence[int], prefix: int) -> TokenConstraint:
        """A copy placed where a sample of `prompt_ids` starts: past the prompt's last `prefix`
        tokens (SamplingParams.constraint_prefix: a sample continued after tokens it already
        sampled under this constraint). ValueError if they do not follow it."""
        started = self.copy()
        if prefix > len(prompt_ids):
            raise ValueError(f"SamplingParams.constraint_prefix={prefix} is longer than the prompt "
                             f"({len(prompt_ids)} tokens); it counts the prompt's last tokens")
        if prefix and not started.matcher.consume_tokens(list(prompt_ids[len(prompt_ids) - prefix :])):
            raise ValueError(f"the prompt's last {prefix} tokens (SamplingParams.constraint_prefix) do not follow "
                             f"its constraint: {started.matcher.get_error()}")
        return started


class ConstraintCompiler:
    """Compiles `SamplingParams` constraints for one checkpoint's tokenizer and vocabulary.

    `vocab_size` is the model's (its logits' width), which may exceed the tokenizer's: ids with
    no token are never allowed. The llguidance tokenizer is built once, on first use (~1 s for
    a 150k vocabulary).
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self._tokenizer = tokenizer
        # the masks' width: the model's vocabulary, or the tokenizer's where that is larger (ids
        # past the logits are cut when the sampler unpacks a mask)
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self._eos_ids = frozenset(eos_ids)

    @functools.cached_property
    def _ll_tokenizer(self) -> Any:
        try:
            import llguidance
        except ImportError as e:  # a dependency of rollout: only a broken install lacks it
            raise RuntimeError(f"structured output needs llguidance (pip install llguidance): {e}") from e
        return llguidance.LLTokenizer(
            self._tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=sorted(self._eos_ids) or None
        )

    def compile(self, sampling: SamplingParams) -> TokenConstraint | None:
        """The constraint of `sampling` at the start of its grammar, or None when it has none
        (`TokenConstraint.start` places it after a prompt). A schema, regex or grammar
        llguidance cannot compile raises ValueError naming it."""
        constraint = sampling.constraint
        if constraint is None:
            return None
        import llguidance

        kind, text = constraint
        noun = kind.replace("_", " ")
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(text)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(text)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._ll_tokenizer)
        if is_error:
            raise ValueError(f"SamplingParams.{kind} could not be compiled: {messages[0]}; fix the {noun}")
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"SamplingParams.{kind} could not be compiled: {matcher.get_error()}; fix the {noun}")
        return TokenConstraint(matcher, bitmask_words(self.vocab_size), self._eos_ids, sampling.ignore_eos)


def bitmask_rows(constraints: Sequence[TokenConstraint | None], rows: int) -> np.ndarray | None:
    """(rows, words) int32 masks, row i from constraints[i] and every token allowed in the
    other rows (padding included); None when no row is constrained."""
    present = [c for c in constraints if c is not None]
    if not present:
        return None
    mask = np.full((rows, present[0].words), -1, np.int32)
    if len(present) == 1:
        present[0].fill(mask[constraints.index(present[0])])
    else:  # rows in parallel, on llguidance's threads (without the GIL)
        from llguidance.numpy import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(_executor(), [(c.matcher, i) for i, c in enumerate(constraints) if c], mask)
        for i, c in enumerate(constraints):
            if c is not None:
                c.mask_eos(mask[i])
    return mask


@functools.cache
def _executor() -> Any:
    """llguidance's thread pool for masks of many rows (one per process)."""
    import llguidance

    return llguidance.LLExecutor()
