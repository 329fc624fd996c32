"""EngineConfig: how one engine serves (batching, lengths, dtype, swap policy)."""

from __future__ import annotations

import dataclasses

SWAP_POLICIES = ("drain", "recompute", "continue")
LOAD_FORMATS = ("auto", "dummy")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  # decode slots; KV cache memory grows linearly with it
    max_seq_len: int = 1024  # prompt + new tokens per sample; KV cache grows linearly with it
    dtype: str = "float32"  # parameter and KV dtype: float32 on CPU, bfloat16 on TPU
    decode_steps: int = 4  # decode steps per host round trip: fewer trips vs. wasted steps at stops
    max_prefill_batch: int = 8  # prompts prefilled together; bounds prefill latency per step
    swap_policy: str = "drain"  # in-flight sequences at a weight swap: drain | recompute | continue
    load_format: str = "auto"  # "dummy": shapes only; real weights arrive by sync
    seed: int = 0  # seeds requests that carry no seed of their own

    def __post_init__(self) -> None:
        if self.swap_policy not in SWAP_POLICIES:
            raise ValueError(f"swap_policy={self.swap_policy!r}: expected one of {SWAP_POLICIES}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={self.load_format!r}: expected one of {LOAD_FORMATS}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: expected float32, bfloat16 or float16")
        for name in ("max_batch", "max_seq_len", "decode_steps", "max_prefill_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an integer >= 1")
