"""Request intake: prompts from callers -> validated `Request`s ready to queue.

Encoding and the request checks are `rollout.prompts.PromptValidator`'s (the driver runs the same
ones before sending anything to a worker). Here a request also gets its seed (a fresh one from
the engine's generator when the caller gave none), its stop ids, and one `Sequence` per sample.
Callers use it from any thread; nothing is queued yet.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from rollout.engine.native.sampling import SamplingRow
from rollout.engine.native.sequence import Request, Sequence
from rollout.engine.native.text import TextOutput
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.structured import ConstraintCompiler, TokenConstraint
from rollout.prompts import Prompt, PromptValidator
from rollout.tokenizer import Tokenizer


class RequestIntake:
    def __init__(
        self, prompts: PromptValidator, tokenizer: Tokenizer, eos_ids: frozenset[int], seed: int,
        constraints: ConstraintCompiler,
    ):
        self._prompts = prompts
        self._constraints = constraints
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()  # numpy generators are not thread-safe

    def request(
        self, prompt: Prompt, sampling: SamplingParams, *, prompt_index: int, return_logprobs: bool, sink: Any = None
    ) -> Request:
        """One prompt as a request. A bad prompt or sampling value (a constraint that does not
        compile included) raises ValueError/TypeError."""
        ids = self._prompts.encode(prompt)
        self._prompts.validate(ids, sampling)
        request = self._build(ids, sampling, prompt_index, return_logprobs, self._starts(sampling, [ids])[0])
        request.sink = sink
        return request

    def encode(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids; a bad prompt raises ValueError/TypeError."""
        return self._prompts.encode(prompt)

    def requests(self, prompts: Seq[Prompt], sampling: SamplingParams, *, return_logprobs: bool) -> list[Request]:
        """Every prompt as a request (prompt_index = position); all are validated before any is
        built, and the first bad one raises naming its index."""
        encoded = self._prompts.encode_all(prompts, sampling)
        starts = self._starts(sampling, encoded)  # a bad constraint raises before any request is built
        return [self._build(ids, sampling, i, return_logprobs, c) for i, (ids, c) in enumerate(zip(encoded, starts))]

    def _starts(self, sampling: SamplingParams, encoded: Seq[list[int]]) -> list[TokenConstraint | None]:
        """Each prompt's constraint where its samples start (None without one), compiled once."""
        base = self._constraints.compile(sampling)
        return [None if base is None else base.start(ids, sampling.constraint_prefix) for ids in encoded]

    def _build(
        self, ids: list[int], sampling: SamplingParams, prompt_index: int, return_logprobs: bool,
        constraint: TokenConstraint | None,
    ) -> Request:
        """The request with one Sequence per sample; the first sample takes `constraint`, the
        others copies of it."""
        seed = sampling.seed
        if seed is None:
            with self._rng_lock:
                seed = int(self._rng.integers(0, 2**31 - 1))
        eos = frozenset() if sampling.ignore_eos else self._eos_ids
        request = Request(prompt_index, ids, sampling, return_logprobs, frozenset(sampling.stop_token_ids) | eos)
        request.return_routed_experts = sampling.return_routed_experts
        request.sequences = [
            Sequence(request, i, SamplingRow.of(sampling, seed, i), TextOutput(self._tokenizer.incremental_detokenizer(), sampling.stop),
                     constraint=constraint if i == 0 or constraint is None else constraint.copy())
            for i in range(sampling.n)
        ]
        return request
