"""Decode throughput as a fraction of what the host allows: the roofline of a benchmark's rows.

A decode step of batch B reads every weight once for B tokens and each sequence's KV so far,
and does about 2 FLOPs per weight per token plus the attention's; the prompt's prefill reads
the weights once and does the same FLOPs for every prompt token. The engine benchmark times
the prefill apart, so its fractions are those of the decode steps alone (the run's time less
the prefill's); a benchmark that times whole runs only gets those of the whole run, prefill
included (`DecodeCost.run_per_token`). So at a measured rate of tok/s tokens per second:

- bandwidth fraction = tok/s x bytes read per token / the measured memory bandwidth. At batch 1
  the step is memory-bound: this is how close the engine runs to the host's memory limit.
- matmul fraction = tok/s x FLOPs per token / the best library's measured matmul rate at the
  decode shape, in the benchmark's dtype. At a large batch the step is compute-bound: this is
  how close it runs to what the host's fastest matmul (JAX's or torch's) does at that shape.

On an accelerator (the benchmark's `--platform gpu|tpu`) both are the device's: its memory
(HBM) bandwidth and its matmul rate, and the bytes per parameter are the dtype's (2 in bfloat16).

The arithmetic is pure (the functions below, with worked examples); `measure_host` takes the
host's figures with rollout.bench.host, and `roofline_lines` prints them with the rows.
Approximations, the same for every engine measured: the whole parameter set counts as read per
step (the LM head reads the tied embedding whole; an untied input embedding is over-counted by
its table), a mixture of experts' tokens are routed uniformly, attention reads the mean
context, and host-side work (scheduling, detokenizing) counts as time, not as bytes or FLOPs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rollout.bench.devices import accelerator_name
from rollout.bench.host import CpuInfo, MatmulRate, cpu_model, matmul_peak, memory_bandwidth

if TYPE_CHECKING:
    from rollout.models.config import ModelConfig


def decode_context(prompt_len: int, new_tokens: int) -> float:
    """Mean number of positions the decode steps after a prompt attend to: the prefill samples
    the first token, then steps feed it and the rest, attending to prompt + 1 ... prompt +
    new_tokens - 1 positions.

    >>> decode_context(32, 64)
    64.0
    """
    return prompt_len + new_tokens / 2


def experts_touched(batch: int, num_experts: int, experts_per_token: int) -> float:
    """The expected share of a layer's experts that a step of `batch` tokens reads, each token
    routed to `experts_per_token` of `num_experts` uniformly at random (1.0 for a dense model).

    >>> experts_touched(1, 32, 4)
    0.125
    >>> round(experts_touched(16, 32, 4), 3)
    0.882
    >>> experts_touched(8, 0, 0)
    1.0
    """
    if num_experts == 0:
        return 1.0
    return 1.0 - (1.0 - experts_per_token / num_experts) ** batch


def decode_matmul_shape(cfg: ModelConfig, batch: int) -> tuple[int, int, int]:
    """The (m, k, n) matmul a decode step of `batch` is made of: [batch x hidden] @ [hidden x
    inter]; for a mixture of experts, one token's experts side by side (inter = top-k x width).

    >>> from types import SimpleNamespace as NS
    >>> decode_matmul_shape(NS(hidden_size=1024, intermediate_size=3072, moe_layers=()), 64)
    (64, 1024, 3072)
    >>> decode_matmul_shape(NS(hidden_size=1024, intermediate_size=3072, moe_layers=(0,),
    ...                        moe_intermediate_size=384, num_experts_per_tok=4), 64)
    (64, 1024, 1536)
    """
    if cfg.moe_layers:
        return batch, cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_experts_per_tok
    return batch, cfg.hidden_size, cfg.intermediate_size


@dataclass(frozen=True)
class DecodeCost:
    """What one decoded token costs a decoder: bytes read and FLOPs. A mixture of experts reads
    only the experts its batch's tokens route to, and computes only each token's top-k."""

    params: int  # all parameters (a tied embedding counted once), experts included
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 4  # float32 weights and KV cache
    expert_params: int = 0  # of `params`, those in experts (0: dense)
    num_experts: int = 0
    experts_per_token: int = 0  # top-k

    @classmethod
    def of(cls, cfg: ModelConfig, params: int, dtype_bytes: int = 4) -> DecodeCost:
        experts = len(cfg.moe_layers) * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
        return cls(params, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype_bytes,
                   experts, cfg.num_experts if experts else 0, cfg.num_experts_per_tok if experts else 0)

    def params_read(self, batch: int) -> float:
        """Parameters a step of `batch` reads: all but the experts, and the experts it routes to.

        >>> DecodeCost(1000, 1, 1, 1, 1, expert_params=800, num_experts=8, experts_per_token=2).params_read(1)
        400.0
        """
        return self.params - self.expert_params + self.expert_params * experts_touched(
            batch, self.num_experts, self.experts_per_token
        )

    def params_used(self) -> float:
        """Parameters each token multiplies by: all but the experts, and its top-k experts."""
        share = self.experts_per_token / self.num_experts if self.num_experts else 1.0
        return self.params - self.expert_params + self.expert_params * share

    def kv_bytes_per_token(self, context: float) -> float:
        """K and V of `context` positions, every layer: what one sequence's step reads of its cache.

        >>> DecodeCost(0, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8).kv_bytes_per_token(10)
        2560.0
        """
        return 2.0 * self.num_layers * self.num_kv_heads * self.head_dim * context * self.dtype_bytes

    def bytes_per_token(self, batch: int, context: float) -> float:
        """Bytes a step of `batch` sequences reads, per token: the weights shared by the batch,
        and each sequence's own KV.

        >>> cost = DecodeCost(1000, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
        >>> cost.bytes_per_token(1, 0)
        4000.0
        >>> cost.bytes_per_token(4, 10)
        3560.0
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return self.params_read(batch) * self.dtype_bytes / batch + self.kv_bytes_per_token(context)

    def run_per_token(self, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
        """(bytes read, FLOPs) of a whole timed generation run per generated token: the
        prompt's prefill (one pass: the weights read once, every prompt token computed, each
        attending to half its prompt on average) and the `new_tokens - 1` decode steps after it
        (the prefill yields the first token): the work a whole run's tokens/s stands for, where
        a benchmark does not time the prefill apart; at batch 64 with 32-token prompts and 64 new tokens the
        prefill is a third of the FLOPs, which the decode-only `flops_per_token` leaves out.

        >>> cost = DecodeCost(1000, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
        >>> cost.run_per_token(1, 1, 1)  # a 1-token prompt, one token: one pass over the weights
        (4000.0, 2128.0)
        >>> b, f = cost.run_per_token(2, 4, 3)
        >>> round(b), round(f)
        (2939, 5621)
        """
        if batch < 1 or new_tokens < 1 or prompt_len < 0:
            raise ValueError(f"batch and new_tokens must be >= 1, prompt_len >= 0; got {batch}, {new_tokens}, {prompt_len}")
        prefill_tokens = batch * prompt_len
        prefill_bytes = self.params_read(max(1, prefill_tokens)) * self.dtype_bytes
        prefill_flops = prefill_tokens * self.flops_per_token(prompt_len / 2)
        steps = new_tokens - 1
        context = decode_context(prompt_len, new_tokens)
        decode_bytes = steps * batch * self.bytes_per_token(batch, context)
        decode_flops = steps * batch * self.flops_per_token(context)
        generated = batch * new_tokens
        return (prefill_bytes + decode_bytes) / generated, (prefill_flops + decode_flops) / generated

    def flops_per_token(self, context: float) -> float:
        """2 FLOPs per parameter used (one multiply-add) plus the attention's q.k and p.v products.

        >>> DecodeCost(1000, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8).flops_per_token(10)
        4560.0
        """
        return 2.0 * self.params_used() + 4.0 * self.num_layers * self.num_heads * self.head_dim * context


def fraction(tok_s: float, per_token: float, capacity: float) -> float:
    """The share of `capacity` (bytes/s or FLOP/s) a rate of `tok_s` uses at `per_token` each.

    >>> fraction(50.0, 4e8, 25e9)
    0.8
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be a positive rate, got {capacity}")
    return tok_s * per_token / capacity


def dtype_bytes(dtype: str) -> int:
    """Bytes of one parameter (and KV value) of `dtype`.

    >>> dtype_bytes("float32"), dtype_bytes("bfloat16")
    (4, 2)
    """
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    if dtype not in sizes:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(sizes)}")
    return sizes[dtype]


@dataclass(frozen=True)
class HostLimits:
    """The host's figures of this run (an accelerator's where `device` names one)."""

    cpu: CpuInfo
    bandwidth: float  # bytes/s, jitted sum far beyond the last-level cache (the device's memory on an accelerator)
    matmul: tuple[MatmulRate, ...]  # per library and decode shape
    dtype: str = "float32"  # of the bandwidth and matmul probes (the benchmark's)
    device: str | None = None  # the accelerator (devices.accelerator_name), None on the CPU
    bandwidth_spread: tuple[float, float] | None = None  # (lowest, highest) probe, where several were taken

    @property
    def peak(self) -> MatmulRate:
        """The fastest library's rate (over the shapes measured)."""
        return max(self.matmul, key=lambda r: r.flops_per_s)

    def to_json(self) -> dict[str, Any]:
        return dict(cpu_model=self.cpu.model, cpu_cores=self.cpu.cores, cpu_flags=list(self.cpu.flags),
                    memory_bandwidth_bytes_s=self.bandwidth, matmul=[r.to_json() for r in self.matmul],
                    matmul_peak_flops_s=self.peak.flops_per_s, matmul_peak_library=self.peak.library,
                    dtype=self.dtype, device=self.device,
                    memory_bandwidth_spread_bytes_s=list(self.bandwidth_spread) if self.bandwidth_spread else None)

    def describe(self) -> list[str]:
        rates = ", ".join(f"{r.library} {r.flops_per_s / 1e9:.1f}" for r in self.matmul)
        shapes = sorted({f"[{r.m}x{r.k}]@[{r.k}x{r.n}]" for r in self.matmul})
        memory = "memory bandwidth" if self.device is None else "device memory bandwidth"
        probes = "best of 5" if self.bandwidth_spread is None else (
            f"best of the probes between the timed runs, which ranged {self.bandwidth_spread[0] / 1e9:.1f}-"
            f"{self.bandwidth_spread[1] / 1e9:.1f}")
        return [
            f"host: {self.cpu.describe()}",
            *([] if self.device is None else [f"device: {self.device}"]),
            f"{memory} {self.bandwidth / 1e9:.1f} GB/s (jitted {self.dtype} sum, far beyond the cache, "
            f"{probes}); "
            f"{self.dtype} matmul {' '.join(shapes)}: {rates} GFLOP/s (peak: {self.peak.library})",
        ]


# Bytes the bandwidth probe sums on an accelerator: ~60x an H100's 50 MB L2, ~1 ms at 3.3 TB/s,
# and fewer than 2**31 elements in bfloat16 (no 64-bit indexing asked of the reduction).
ACCELERATOR_PROBE_BYTES = 3 << 30


def measure_host(
    matmul_shapes: Sequence[tuple[int, int, int]], dtype: str = "float32", platform: str = "cpu"
) -> HostLimits:
    """The CPU, memory bandwidth and matmul rates at `matmul_shapes` ((batch, hidden, inter)), in
    `dtype`; on an accelerator (`platform` gpu or tpu) the device's, torch's on CUDA for gpu."""
    if platform == "cpu":
        return HostLimits(cpu_model(), memory_bandwidth(dtype=dtype),
                          tuple(matmul_peak(matmul_shapes, dtype=dtype)), dtype)
    torch_device = "cuda" if platform == "gpu" else "cpu"
    return HostLimits(
        cpu_model(), memory_bandwidth(ACCELERATOR_PROBE_BYTES, repeats=5, dtype=dtype, calls=10),
        tuple(matmul_peak(matmul_shapes, dtype=dtype, torch_device=torch_device)), dtype,
        accelerator_name(torch_device),
    )


def roofline_fields(
    cost: DecodeCost, limits: HostLimits, batch: int, tok_s: float, prompt_len: int, new_tokens: int,
    decode_tok_s: float | None = None,
) -> dict[str, Any]:
    """The roofline figures of one measured row, JSON-ready. With `decode_tok_s` (the decode
    steps' own rate: the run's time less its prefill's), those of a decode step at the steps'
    mean context (basis "decode"); without it, those of the whole run at `tok_s` (basis "run":
    the prefill's bytes and FLOPs counted too, see `DecodeCost.run_per_token`)."""
    if decode_tok_s is not None:
        context = decode_context(prompt_len, new_tokens)
        per_byte, per_flop, rate, basis = cost.bytes_per_token(batch, context), cost.flops_per_token(context), decode_tok_s, "decode"
    else:
        (per_byte, per_flop), rate, basis = cost.run_per_token(batch, prompt_len, new_tokens), tok_s, "run"
    return dict(
        basis=basis, rate_tok_s=rate, bytes_per_token=per_byte, flops_per_token=per_flop,
        bytes_s=rate * per_byte, flops_s=rate * per_flop,
        bandwidth_fraction=fraction(rate, per_byte, limits.bandwidth),
        matmul_fraction=fraction(rate, per_flop, limits.peak.flops_per_s),
    )


def roofline_lines(limits: HostLimits, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The host's figures and a table of rows, each with keys label, batch, tok_s, ratio (to
    transformers) and the roofline_fields."""
    lines = [*limits.describe(),
             "roofline: per generated token, bytes = weights read per step / batch + KV read; FLOPs = 2 x params "
             "used + attention (MoE: the experts routed to); 'decode': the decode steps alone (the run's time less "
             "its prefill's, timed apart), 'run': the whole run, prefill included; % of bandwidth matters at batch "
             "1, % of matmul peak at the largest batch; 'vs transformers' compares whole runs"]
    lines.append(f"{'engine':>12} {'batch':>5} {'tok/s':>8} {'basis':>6} {'at tok/s':>9} {'GB/s read':>10} "
                 f"{'% bandwidth':>12} {'GFLOP/s':>8} {'% matmul peak':>14} {'vs transformers':>16}")
    lines.extend(
        f"{r['label']:>12} {r['batch']:>5} {r['tok_s']:>8.1f} {r['basis']:>6} {r['rate_tok_s']:>9.1f} "
        f"{r['bytes_s'] / 1e9:>10.1f} {100 * r['bandwidth_fraction']:>11.0f}% {r['flops_s'] / 1e9:>8.1f} "
        f"{100 * r['matmul_fraction']:>13.0f}% {r['ratio']:>15.2f}x"
        for r in rows
    )
    return lines


def roofline_table(
    cfg: ModelConfig, params: int, args: Any, rows: list[dict[str, Any]], sides: Sequence[tuple[str, str, str | None]],
    bandwidth_samples: Sequence[float] = (),
) -> tuple[dict[str, Any], list[str]]:
    """Measure the host at the largest batch's decode shape, add each row's roofline fields per
    side (from its decode steps' rate, "<tok key less _tok_s>_decode_tok_s", where the row has
    one), and return (the host's JSON, the lines to print).

    `bandwidth_samples`: bandwidth probes taken between the benchmark's timed runs (a shared
    host's memory bandwidth drifts by tens of percent within minutes): the best of them and of
    the probe taken here is the host's bandwidth, their spread is printed.
    `args` has `batches`, `prompt_len`, `new_tokens` (and may have `dtype`, default float32, and
    `platform`, default cpu); each side is (label, the row's tok/s key,
    the row's ratio key or None for the reference, 1.0); a side's fields go under
    "<label>_roofline", except "rollout", whose go under "roofline".
    """
    dtype = getattr(args, "dtype", None) or "float32"
    limits = measure_host([decode_matmul_shape(cfg, max(args.batches))], dtype, getattr(args, "platform", "cpu"))
    if bandwidth_samples:  # probes taken between the timed runs: the host at its best over the run
        probes = [limits.bandwidth, *bandwidth_samples]
        limits = dataclasses.replace(limits, bandwidth=max(probes), bandwidth_spread=(min(probes), max(probes)))
    cost = DecodeCost.of(cfg, params, dtype_bytes(dtype))
    table = []
    for r in rows:
        for label, tok_key, ratio_key in sides:
            key = "roofline" if label == "rollout" else f"{label}_roofline"
            decode = r.get(tok_key.removesuffix("_tok_s") + "_decode_tok_s")  # measured by the engine bench
            r[key] = roofline_fields(cost, limits, r["batch"], r[tok_key], args.prompt_len, args.new_tokens, decode)
            ratio = r[ratio_key] if ratio_key else 1.0
            table.append(dict(label=label, batch=r["batch"], tok_s=r[tok_key], ratio=ratio, **r[key]))
    return limits.to_json(), roofline_lines(limits, table)
