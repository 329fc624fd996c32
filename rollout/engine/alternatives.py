"""Top-k alternatives per generated token (OpenAI's `top_logprobs`): what crosses processes.

`SamplingParams.top_logprobs = N` (0..MAX_TOP_LOGPROBS) asks for the N most likely tokens at every
generated position, with their logprobs under the distribution the sampled token's logprob comes
from (log_softmax(logits / temperature), untruncated; the raw log_softmax when greedy). The
native engine computes them on the device in the sampler (rollout.engine.native.sampling.sample_top)
and they ride beside the sampled tokens: `Completion.top_logprobs`, `TokenDelta.top_logprobs`
(the delta's rows), and the HTTP server's `top_logprobs`.

>>> a = TopLogprobs(np.array([[5, 2]], np.int32), np.array([[-0.1, -2.5]], np.float32))
>>> b = TopLogprobs.concat([a, a])
>>> b.token_ids.shape, b[1:].logprobs.tolist()
((2, 2), [[-0.10000000149011612, -2.5]])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# OpenAI's limit for both endpoints; the device computes this many whenever any row asks for any
# (one more compiled variant of each step, not one per N), and each sample keeps its own N.
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class TopLogprobs:
    """The N most likely tokens at each of T positions, most likely first."""

    token_ids: np.ndarray  # (T, N) int32
    logprobs: np.ndarray  # (T, N) float32

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def __getitem__(self, rows: slice) -> TopLogprobs:
        return TopLogprobs(self.token_ids[rows], self.logprobs[rows])

    @staticmethod
    def empty(n: int) -> TopLogprobs:
        return TopLogprobs(np.zeros((0, n), np.int32), np.zeros((0, n), np.float32))

    @staticmethod
    def concat(parts: Sequence[TopLogprobs]) -> TopLogprobs:
        """The rows of `parts` one after the other (at least one part)."""
        if len(parts) == 1:
            return parts[0]
        return TopLogprobs(
            np.concatenate([p.token_ids for p in parts]).astype(np.int32),
            np.concatenate([p.logprobs for p in parts]).astype(np.float32),
        )

    def rows(self) -> list[list[tuple[int, float]]]:
        """Per position, its (token id, logprob) pairs, most likely first."""
        return [list(zip(ids.tolist(), lps.tolist())) for ids, lps in zip(self.token_ids, self.logprobs)]
