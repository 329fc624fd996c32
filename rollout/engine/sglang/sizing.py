"""How much host memory an sglang-jax worker takes on CPU, estimated before any worker starts.

The adapter sizes sglang-jax from EngineConfig (adapter.SglangEngine._start_sglang): a KV pool
of `max_total_tokens = max_batch x (max_seq_len + 6)` tokens, allocated at start, plus the
weights. At the defaults (64 x 2048) the pool of Qwen3-0.6B alone is 15 GiB in bfloat16 and
30 GiB in float32 per worker; on a CPU host Ray's memory monitor then kills the worker during
its start-up precompile, and Ray restarts it. `check_host_memory` refuses such a fleet up front
with the estimate and a max_batch that fits (the coordinator calls it on CPU).

    >>> from rollout.models.config import ModelConfig
    >>> qwen3_06b = ModelConfig("Qwen3ForCausalLM", 151936, 1024, 3072, 28, 16, 8, 128, 1e6, 1e-6, True, 40960, True, False)
    >>> round(estimate(qwen3_06b, EngineConfig(dtype="bfloat16")).kv_bytes / 2**30, 1)
    14.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from rollout.engine.config import EngineConfig
from rollout.models.config import ModelConfig

CONTEXT_HEADROOM = 6  # positions sglang-jax keeps beyond max_seq_len (adapter._CONTEXT_HEADROOM)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Beyond KV and weights: an allowance for the runtime, compiled programs and the warm-up's
# activations (not measured per model; sglang-jax does not run on this project's 3.11 hosts).
_OVERHEAD_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    kv_bytes: int  # the KV pool: max_batch x (max_seq_len + 6) tokens
    weight_bytes: int
    overhead_bytes: int

    @property
    def total(self) -> int:
        return self.kv_bytes + self.weight_bytes + self.overhead_bytes


def estimate(model: ModelConfig, cfg: EngineConfig) -> MemoryEstimate:
    """One worker's host memory at `cfg` (the weights and KV pool in cfg.dtype)."""
    size = _DTYPE_BYTES[cfg.dtype]
    tokens = cfg.max_batch * (cfg.max_seq_len + CONTEXT_HEADROOM)
    kv_per_token = model.num_layers * 2 * model.num_kv_heads * model.head_dim * size
    h, q, kv = model.hidden_size, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * model.intermediate_size
    embeddings = model.vocab_size * h * (1 if model.tie_word_embeddings else 2)
    return MemoryEstimate(tokens * kv_per_token, (model.num_layers * per_layer + embeddings) * size, _OVERHEAD_BYTES)


def check_host_memory(model: ModelConfig, cfg: EngineConfig, num_workers: int, node_memory: Sequence[float]) -> None:
    """Raise MemoryError unless `num_workers` workers at `cfg` fit in the nodes' memory
    (Ray's `memory` resource of each node, bytes), one worker at least on the largest node."""
    need = estimate(model, cfg)
    largest, total = max(node_memory, default=0.0), float(sum(node_memory))
    if need.total <= largest and need.total * num_workers <= total:
        return
    per_worker = min(largest, total / num_workers)
    fixed = need.weight_bytes + need.overhead_bytes
    per_slot = need.kv_bytes / cfg.max_batch
    fits = int((per_worker - fixed) // per_slot) if per_worker > fixed else 0
    smaller_dtype = ", or use dtype='bfloat16'" if cfg.dtype == "float32" else ""
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731 - a formatter for the message below
    advice = (
        f"lower max_batch to {fits} or less (or max_seq_len),"
        if fits >= 1
        else "the weights alone do not fit: use a smaller model or a larger host,"
    )
    raise MemoryError(
        f"engine='sglang-jax' at max_batch={cfg.max_batch} x max_seq_len={cfg.max_seq_len} ({cfg.dtype}) needs "
        f"about {gib(need.total)} per worker (KV pool {gib(need.kv_bytes)} for max_batch x (max_seq_len + "
        f"{CONTEXT_HEADROOM}) tokens, weights {gib(need.weight_bytes)}, runtime {gib(need.overhead_bytes)}); "
        f"{num_workers} worker(s) would need {gib(need.total * num_workers)}, and the cluster's nodes have "
        f"{gib(total)} of memory for tasks (largest node {gib(largest)}; Ray's `memory` resource). Its workers would "
        f"be killed for memory while starting. To fit: {advice} run fewer workers{smaller_dtype}."
    )
