"""SamplingParams: what a caller may ask of generation. Plain Python (no jax), validated at once."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from rollout.engine.alternatives import MAX_TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # new tokens per sample, at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    n: int = 1  # samples per prompt; they share one prefill (GRPO groups)
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids besides the checkpoint's EOS ids
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    # mixture-of-experts models: each Completion carries `routed_experts`, the experts of every
    # fed position (for routing replay in scoring/training); refused on a dense model
    return_routed_experts: bool = False
    # the N most likely alternatives of every generated token, with logprobs (Completion.top_logprobs;
    # rollout.engine.alternatives); 0 = off, and then nothing is computed for them
    top_logprobs: int = 0
    # structured output (at most one; rollout.engine.structured): the text must match a
    # JSON schema (a dict or its JSON text; {"type": "object"} for any JSON object), a regular
    # expression (Rust regex syntax), or a Lark grammar (llguidance's dialect). Each token is
    # drawn from the tokens the constraint allows there; its logprob stays the model's (unmasked)
    json_schema: Any = None
    regex: str | None = None
    grammar: str | None = None
    # the prompt's last N tokens were sampled under this constraint already (a sample continued
    # on another worker): the constraint starts before them, not at the prompt's end
    constraint_prefix: int = 0

    def __post_init__(self) -> None:
        # Accept lists for convenience; store tuples so the params stay hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.json_schema, dict):  # held as canonical JSON text: hashable, and sent as is
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))  # key order kept: it is the output's
        self.validate()

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of the structured-output constraint: kind "json_schema", "regex" or
        "grammar"; None when the output is free."""
        for kind in ("json_schema", "regex", "grammar"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None

    def validate(self) -> None:
        def bad(field: str, value: object, want: str) -> ValueError:
            return ValueError(f"SamplingParams.{field}={value!r} is invalid: expected {want}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "a number in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise bad("n", self.n, "an integer >= 1")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**31):
            raise bad("seed", self.seed, "None or an integer in [0, 2**31)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "non-empty strings")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "non-negative integers")
        if not isinstance(self.return_routed_experts, bool):
            raise bad("return_routed_experts", self.return_routed_experts, "a bool")
        if not isinstance(self.top_logprobs, int) or isinstance(self.top_logprobs, bool) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", self.top_logprobs, f"an integer in [0, {MAX_TOP_LOGPROBS}] (0 = off)")
        given = [k for k in ("json_schema", "regex", "grammar") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"SamplingParams: {', '.join(given)} are set; a sample follows at most one constraint")
        for kind in given:
            if not isinstance(getattr(self, kind), str) or not getattr(self, kind):
                want = "a JSON schema as a dict or its JSON text" if kind == "json_schema" else "a non-empty string"
                raise bad(kind, getattr(self, kind), want)
        if not isinstance(self.constraint_prefix, int) or isinstance(self.constraint_prefix, bool) or self.constraint_prefix < 0:
            raise bad("constraint_prefix", self.constraint_prefix, "an integer >= 0")
        if self.constraint_prefix and not given:
            raise bad("constraint_prefix", self.constraint_prefix, "0 without json_schema, regex or grammar")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise bad("json_schema", self.json_schema, f"a JSON schema as a dict or valid JSON text ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise bad("json_schema", self.json_schema, "a JSON object (a schema), e.g. {'type': 'object'}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
