"""What generation returns, and the errors the engine raises."""

from __future__ import annotations

import dataclasses

import numpy as np

from rollout.engine.alternatives import TopLogprobs


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sample of one prompt.

    `weight_version` is the version that produced the last token. Under the `drain` policy (the
    default) every token of a completion comes from one version; under `recompute` and
    `continue` a completion in flight at a swap mixes versions, and `token_versions` says which
    version produced each token.

    `routed_experts` (mixture-of-experts models, when asked for with
    SamplingParams.return_routed_experts): int16 (prompt tokens + completion tokens - 1, MoE
    layers, top_k), the experts every position fed through the model used, most probable first;
    the last completion token is never fed. Row t belongs to the forward that last computed
    position t: under `continue` a position keeps the route of the version that decoded it,
    under `recompute` (and a paged resume) the re-prefill's routes replace earlier ones.
    `score(..., routed_experts=...)` (Engine, RolloutService, rollout.score) replays them; token
    streams carry them on each sample's last TokenDelta, the HTTP server per choice.

    `top_logprobs` (when asked for with SamplingParams.top_logprobs = N): the N most likely
    tokens at each completion position and their logprobs, (completion tokens, N) each, from
    the same distribution as `logprobs` (rollout.engine.alternatives).
    """

    prompt_index: int
    sample_index: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] | None
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: int
    token_versions: tuple[int, ...]
    routed_experts: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    top_logprobs: TopLogprobs | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def mixed_versions(self) -> bool:
        return len(set(self.token_versions)) > 1


class EngineClosedError(RuntimeError):
    """The engine was shut down; the request was not (fully) served."""


class WeightSyncError(RuntimeError):
    """A stage/commit/abort call that breaks the weight-sync protocol."""
