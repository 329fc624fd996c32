"""What generation returns, and the errors the engine raises."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sample of one prompt.

    `weight_version` is the version that produced the last token. Under the `drain` policy (the
    default) every token of a completion comes from one version; under `recompute` and
    `continue` a completion in flight at a swap mixes versions, and `token_versions` says which
    version produced each token.
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

    @property
    def mixed_versions(self) -> bool:
        return len(set(self.token_versions)) > 1


class EngineClosedError(RuntimeError):
    """The engine was shut down; the request was not (fully) served."""


class WeightSyncError(RuntimeError):
    """A stage/commit/abort call that breaks the weight-sync protocol."""
