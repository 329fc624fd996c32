"""Requests and their sequences: what the engine keeps for each prompt and each of its samples.

A `Request` is one prompt with its sampling parameters and the future its caller holds; it
has `n` `Sequence`s (the samples), which share its prefill. A sequence is everything one sample
has produced (tokens, logprobs, the weight version of each token, its text) plus the slot it
decodes in while it runs (-1 while it waits or once it finished). The scheduler thread is the
only writer of both while the request runs; the caller only sees the `Completion`s.

A request's future is a `RequestFuture`: it also holds the request's cancel state, decided under
its own lock so that `Engine.cancel` answers truthfully when a request finishes at that instant.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from rollout.engine.alternatives import TopLogprobs
from rollout.engine.native.sampling import SamplingRow
from rollout.engine.native.text import TextOutput
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.structured import TokenConstraint
from rollout.engine.types import Completion


class RequestFuture(Future[list[Completion]]):
    """The future of one request, and whether it was cancelled or finished by itself first.

    Both are decided under `cancel_lock`: the scheduler thread accepts each token of the request
    under it (`accepting`), and `Engine.cancel` claims the request under it (`claim_cancel`).
    So either the cancel comes first and no token is accepted after it (the unfinished samples
    end "abort"), or every sample finished first and the cancel is refused: never both.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cancel_lock = threading.Lock()
        self.cancel_asked = False
        self.settled = False  # every sample finished by itself: its result is on the way

    def claim_cancel(self) -> bool:
        """Mark the request cancelled; False if it finished (or failed) first."""
        with self.cancel_lock:
            if self.settled or self.done():
                return False
            self.cancel_asked = True
            return True


@dataclasses.dataclass(eq=False)
class Request:
    prompt_index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    return_logprobs: bool
    stop_ids: frozenset[int]  # stop_token_ids, plus the EOS ids unless ignore_eos
    future: RequestFuture = dataclasses.field(default_factory=RequestFuture)
    sequences: list[Sequence] = dataclasses.field(default_factory=list)
    sink: Any = None  # a streaming.TokenSink fed as tokens are accepted (streamed requests only)
    return_routed_experts: bool = False  # keep the experts every fed position used (MoE models)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


@dataclasses.dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # sample index within the request
    sampling: SamplingRow  # what its slot's row of the sampler holds
    text: TextOutput
    slot: int = -1
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)  # weight version of each token
    finish_reason: str | None = None
    # the experts of each fed position, (moe layers, k) each, when the request asks for them
    routes: list[np.ndarray] = dataclasses.field(default_factory=list)
    # per token, its top-k alternatives (ids, logprobs), (top_logprobs,) each, when asked for
    top: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    # structured output: what it may take next (rollout.engine.structured); None = free
    constraint: TokenConstraint | None = None

    def context(self) -> list[int]:
        """Prompt + generated tokens: what a re-prefill of this sequence reads."""
        return self.request.prompt_ids + self.tokens

    @property
    def position(self) -> int:
        """Position of the last token (sampled, not yet in the KV cache)."""
        return len(self.request.prompt_ids) + len(self.tokens) - 1

    def append(
        self, token: int, logprob: float, version: int, routes: np.ndarray | None = None,
        top: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> str | None:
        """Record a sampled token; the finish reason if a stop fires ("stop" | "length"), else None.

        `routes` (n, moe layers, k): the experts of the last n fed positions, those of the
        forward that sampled `token` (a prefill: the whole context; a decode step: the token fed).
        They replace what was recorded for those positions: a re-prefill (a `recompute` swap, a
        resumed sequence) recomputes them on the weights it runs with. `top`: the step's top-k
        alternatives at `token`'s position (ids, logprobs), of which the first
        `sampling.top_logprobs` are kept.
        """
        self.tokens.append(token)
        keep = self.request.sampling.top_logprobs
        if keep:
            if top is None:  # a bug: the sampler row asked for them (SamplingRow.top_logprobs)
                raise RuntimeError(f"a step computed no alternatives for a sample that asked for {keep}")
            self.top.append((np.asarray(top[0][:keep], np.int32), np.asarray(top[1][:keep], np.float32)))
        self.logprobs.append(logprob)
        self.versions.append(version)
        if routes is not None and self.request.return_routed_experts:
            fed = len(self.request.prompt_ids) + len(self.tokens) - 1
            del self.routes[fed - len(routes) :]
            self.routes.extend(routes)
        verdict = None if self.constraint is None else self.constraint.accept(token)  # "stop" | "abort" | None
        if verdict == "abort":
            reason = "abort"
        elif self.text.push(token) or token in self.request.stop_ids or verdict == "stop":
            reason = "stop"
        elif len(self.tokens) >= self.request.sampling.max_tokens:
            reason = "length"
        else:
            return None
        self.text.finish()
        return reason

    def completion(self, serving_version: int) -> Completion:
        request = self.request
        return Completion(
            prompt_index=request.prompt_index,
            sample_index=self.index,
            prompt_token_ids=tuple(request.prompt_ids),
            token_ids=tuple(self.tokens),
            text=self.text.text,
            logprobs=tuple(self.logprobs) if request.return_logprobs else None,
            finish_reason=self.finish_reason or "abort",
            weight_version=self.versions[-1] if self.versions else serving_version,
            token_versions=tuple(self.versions),
            routed_experts=self.routed_experts(),
            top_logprobs=self.top_logprobs(),
        )

    def top_logprobs(self, start: int = 0) -> TopLogprobs | None:
        """The alternatives of tokens[start:] ((tokens, N) each), or None if not asked for."""
        keep = self.request.sampling.top_logprobs
        if not keep:
            return None
        rows = self.top[start:]
        if not rows:
            return TopLogprobs.empty(keep)
        return TopLogprobs(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))

    def routed_experts(self) -> np.ndarray | None:
        """(prompt + completion tokens - 1, moe layers, k) int16, or None if not asked for."""
        if not self.request.return_routed_experts:
            return None
        if not self.routes:  # nothing fed yet (aborted before its prefill)
            return np.zeros((0, 0, 0), np.int16)
        return np.stack(self.routes).astype(np.int16)
