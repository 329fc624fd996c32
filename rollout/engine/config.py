"""EngineConfig: how one engine serves (batching, lengths, dtype, swap policy).

Its field defaults are the defaults of `rollout.init`, `RolloutService` and the command line
(each reads them from here); the README's options table lists them (a test compares).
"""

from __future__ import annotations

import dataclasses

SWAP_POLICIES = ("drain", "recompute", "continue")
LOAD_FORMATS = ("auto", "dummy")
DTYPES = ("float32", "bfloat16", "float16")
KV_LAYOUTS = ("contiguous", "paged")
QUANTIZATIONS = ("int8", "fp8")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    # KV cache memory = layers x 2 x max_batch x kv_heads x max_seq_len x head_dim x dtype size,
    # e.g. Qwen3-0.6B in bfloat16 at 64 x 2048: 14 GiB (one TPU host); size both to the workload
    max_batch: int = 64  # decode slots; more = more samples decoded per step
    max_seq_len: int = 2048  # prompt + new tokens per sample
    dtype: str = "float32"  # parameter and KV dtype: float32 on CPU, bfloat16 on TPU
    decode_steps: int = 4  # decode steps per host round trip: fewer trips vs. wasted steps at stops
    max_prefill_batch: int = 8  # prompts prefilled together; bounds prefill latency per step
    swap_policy: str = "drain"  # in-flight sequences at a weight swap: drain | recompute | continue
    load_format: str = "auto"  # "dummy": shapes only; real weights arrive by sync
    seed: int = 0  # seeds requests that carry no seed of their own
    # KV layout. "contiguous": one max_seq_len region per slot (the memory above). "paged": a
    # shared pool of pages (rollout.engine.native.kv.paged); max_seq_len is then a per-request limit, max_batch
    # the decode rows, and KV memory the pool: kv_pages, or kv_memory_fraction of device memory
    # (TPU/GPU), by default the contiguous layout's memory.
    kv_layout: str = "contiguous"
    page_size: int = 16  # paged: positions per page (smaller: less waste per sequence, longer tables)
    kv_pages: int | None = None  # paged: pool size in pages
    kv_memory_fraction: float | None = None  # paged: pool = this fraction of device memory, less what is in use
    # paged: the fraction of its remaining max_tokens a running sequence is planned to generate,
    # for admission (rollout.engine.native.kv.paged.admission). None: learned from finished sequences. 1: no
    # preemption (admits less; except one request whose n samples outgrow the pool, and
    # recompute swaps); 0: admit on the next decode call's pages (more preemptions).
    kv_admission_ratio: float | None = None
    # Bitwise-reproducible numbers (rollout.models.invariant): a request's tokens and logprobs do
    # not depend on the rest of the batch, and `score` returns generate's logprobs bit for bit.
    # Costs speed (fixed-shape matmul tiles, blocked attention); dense models, native engine only.
    batch_invariant: bool = False
    # Weight-only quantization of the linear layers' kernels and the output head, per output
    # channel (rollout.engine.quantized): None keeps `dtype`. "int8": ~1/4 of float32's weight
    # bytes (decode at small batch reads every weight per token), logprobs off by ~1e-2 (the
    # trainer corrects with TIS). "fp8" (e4m3): only where matmuls run fp8 (TPU v5p+, H100).
    # Every sync re-quantizes the full-precision update on the worker.
    quantization: str | None = None
    # paged: keep prompts' full pages after use and let a later prompt that starts with the same
    # tokens share them instead of prefilling them (rollout.engine.native.kv.paged.prefix_cache);
    # dropped at every weight swap. Idle cached pages are evicted under pool pressure. The
    # contiguous layout has no prefix cache (this option does nothing there).
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.swap_policy not in SWAP_POLICIES:
            raise ValueError(f"swap_policy={self.swap_policy!r}: expected one of {SWAP_POLICIES}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={self.load_format!r}: expected one of {LOAD_FORMATS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {DTYPES}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r}: expected None or one of {QUANTIZATIONS}")
        if self.quantization is not None and self.batch_invariant:
            raise ValueError(
                f"quantization={self.quantization!r} with batch_invariant=True: the invariant mode's matmul tiles "
                "take full-precision kernels; choose one"
            )
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout={self.kv_layout!r}: expected one of {KV_LAYOUTS}")
        if self.kv_pages is not None and self.kv_memory_fraction is not None:
            raise ValueError("give kv_pages or kv_memory_fraction, not both")
        if self.kv_pages is not None and self.kv_pages < 1:
            raise ValueError(f"kv_pages={self.kv_pages!r}: expected an integer >= 1")
        if self.kv_memory_fraction is not None and not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction={self.kv_memory_fraction!r}: expected a number in (0, 1]")
        if self.kv_admission_ratio is not None and not 0.0 <= self.kv_admission_ratio <= 1.0:
            raise ValueError(f"kv_admission_ratio={self.kv_admission_ratio!r}: expected a number in [0, 1], or None to learn it")
        for name in ("max_batch", "max_seq_len", "decode_steps", "max_prefill_batch", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an integer >= 1")
