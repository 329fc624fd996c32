"""Encoding and validating prompts on the driver, before anything is queued on a worker.

The checks and messages are the engine's (its request intake, `rollout.engine.native.intake`, runs
them too), computed from the model config, the tokenizer and the engine config alone, so the
driver stays jax-free and a bad prompt fails the whole call at once, with nothing sent to any
worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rollout.engine.config import EngineConfig
from rollout.engine.sampling_params import SamplingParams
from rollout.models.config import ModelConfig
from rollout.tokenizer import Tokenizer

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


class PromptValidator:
    """Prompts -> token ids, with the engine's request checks."""

    def __init__(self, model_config: ModelConfig, tokenizer: Tokenizer, engine_config: EngineConfig):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.engine_config = engine_config

    def encode(self, prompt: Any) -> list[int]:
        """A string, chat messages (list of {"role", "content"}), or token ids -> token ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, np.ndarray):
            ids = prompt.tolist()
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        elif isinstance(prompt, Sequence):
            ids = list(prompt)
        else:
            raise TypeError(
                f"a prompt must be a string, chat messages or a list of token ids; got {type(prompt).__name__}"
            )
        bad = [t for t in ids if not isinstance(t, (int, np.integer)) or isinstance(t, bool)]
        if bad:
            raise TypeError(f"token ids must be integers; got {type(bad[0]).__name__} ({bad[0]!r})")
        return [int(t) for t in ids]

    @staticmethod
    def check_sampling(sampling: SamplingParams) -> None:
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a rollout.SamplingParams, got {type(sampling).__name__}")
        sampling.validate()

    def validate(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self.check_sampling(sampling)
        if sampling.return_routed_experts and not self.model_config.is_moe:
            raise ValueError(
                f"return_routed_experts=True needs a mixture-of-experts model; {self.model_config.architecture} "
                "is dense (it routes nothing); leave return_routed_experts False"
            )
        if not prompt_ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        vocab = self.model_config.vocab_size
        oov = [t for t in prompt_ids if not 0 <= t < vocab]
        if oov:
            raise ValueError(f"token id {oov[0]} is outside the vocabulary [0, {vocab}) ({len(oov)} such id(s))")
        cfg = self.engine_config
        total = len(prompt_ids) + sampling.max_tokens
        if total > cfg.max_seq_len:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens={sampling.max_tokens} = {total} "
                f"exceeds max_seq_len={cfg.max_seq_len}; shorten the prompt, lower "
                "max_tokens, or start the engine with a larger max_seq_len"
            )
        if sampling.n > cfg.max_batch:
            raise ValueError(
                f"n={sampling.n} samples cannot run together in max_batch={cfg.max_batch} "
                "slots; lower n or raise max_batch"
            )

    def encode_all(self, prompts: Sequence[Prompt], sampling: SamplingParams) -> list[list[int]]:
        """Encode and validate every prompt; the first bad one raises, naming its index."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of prompts (strings, chat messages or token-id lists)")
        self.check_sampling(sampling)  # also for an empty list of prompts
        out = []
        for index, prompt in enumerate(prompts):
            try:
                ids = self.encode(prompt)
                self.validate(ids, sampling)
            except (TypeError, ValueError) as err:
                if len(prompts) == 1 or "SamplingParams" in str(err) or "sampling must be" in str(err):
                    raise
                raise type(err)(f"prompt {index}: {err}") from err
            out.append(ids)
        return out
