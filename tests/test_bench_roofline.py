"""The benchmarks' host reference: the probes of rollout.bench.host return sane figures on tiny
sizes (speed is never asserted), and the roofline arithmetic of rollout.bench.roofline holds."""

from __future__ import annotations

import doctest
import math

import pytest

from rollout.bench import host, roofline
from rollout.bench.host import CpuInfo, MatmulRate
from rollout.bench.roofline import DecodeCost, HostLimits

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Some Other CPU
flags\t\t: fpu
"""

COST = DecodeCost(params=1_000_000, num_layers=4, num_heads=16, num_kv_heads=8, head_dim=128)


def limits(bandwidth: float = 20e9, jax_rate: float = 100e9, torch_rate: float = 150e9) -> HostLimits:
    return HostLimits(
        CpuInfo("test cpu", 2, ("avx2",)), bandwidth,
        (MatmulRate("jax", 64, 1024, 3072, jax_rate), MatmulRate("torch", 64, 1024, 3072, torch_rate)),
    )


@pytest.mark.parametrize("module", [host, roofline])
def test_docstring_examples_hold(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_parse_cpuinfo_names_the_first_cpu_and_its_notable_flags_in_a_fixed_order():
    cpu = host.parse_cpuinfo(CPUINFO, 2)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert cpu.flags == ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    assert cpu.describe().startswith("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, 2 cores, avx2")


def test_cpu_model_of_this_host_has_a_name_and_cores():
    cpu = host.cpu_model()
    assert cpu.model and cpu.cores >= 1
    assert set(cpu.flags) <= set(host.NOTABLE_FLAGS)


def test_memory_bandwidth_on_a_small_array_is_a_positive_finite_rate():
    rate = host.memory_bandwidth(nbytes=1 << 20, repeats=1)
    assert math.isfinite(rate) and rate > 0


def test_matmul_peak_gives_a_positive_rate_per_library_and_shape():
    rates = host.matmul_peak([(2, 8, 16), (4, 16, 8)], repeats=1, target_seconds=0.001)
    libraries = ["jax", "torch"] if host.torch_installed() else ["jax"]
    assert [(r.library, r.m, r.k, r.n) for r in rates] == [
        (lib, *shape) for shape in ((2, 8, 16), (4, 16, 8)) for lib in libraries
    ]
    assert all(math.isfinite(r.flops_per_s) and r.flops_per_s > 0 for r in rates)


def test_matmul_peak_rejects_an_empty_dimension():
    with pytest.raises(ValueError, match="positive sizes"):
        host.matmul_peak([(0, 8, 16)])


def test_bytes_per_token_shares_the_weights_across_the_batch_but_not_the_kv():
    kv = COST.kv_bytes_per_token(100)
    assert kv == 2 * 4 * 8 * 128 * 100 * 4
    assert COST.bytes_per_token(1, 100) == 4_000_000 + kv
    assert COST.bytes_per_token(16, 100) == 4_000_000 / 16 + kv


def test_bytes_per_token_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="batch must be >= 1"):
        COST.bytes_per_token(0, 10)


def test_flops_per_token_are_two_per_parameter_plus_attention_over_the_context():
    assert COST.flops_per_token(0) == 2_000_000
    assert COST.flops_per_token(10) == 2_000_000 + 4 * 4 * 16 * 128 * 10


def test_roofline_fields_measure_the_decode_rate_against_the_bandwidth_and_the_best_librarys_peak():
    host_limits = limits()
    fields = roofline.roofline_fields(COST, host_limits, batch=1, tok_s=40.0, prompt_len=32, new_tokens=64,
                                      decode_tok_s=50.0)
    assert fields["basis"] == "decode" and fields["rate_tok_s"] == 50.0
    assert fields["bytes_s"] == pytest.approx(50.0 * COST.bytes_per_token(1, 64.0))
    assert fields["bandwidth_fraction"] == pytest.approx(fields["bytes_s"] / 20e9)
    assert host_limits.peak.library == "torch"
    assert fields["matmul_fraction"] == pytest.approx(50.0 * COST.flops_per_token(64.0) / 150e9)


def test_without_a_decode_rate_the_fields_are_those_of_the_whole_run():
    fields = roofline.roofline_fields(COST, limits(), batch=4, tok_s=40.0, prompt_len=32, new_tokens=64)
    per_byte, per_flop = COST.run_per_token(4, 32, 64)
    assert fields["basis"] == "run" and fields["rate_tok_s"] == 40.0
    assert fields["bytes_s"] == pytest.approx(40.0 * per_byte) and fields["flops_s"] == pytest.approx(40.0 * per_flop)


def test_a_runs_cost_per_token_adds_the_prompts_prefill_to_the_decode_steps():
    batch, prompt, new = 64, 32, 64
    per_byte, per_flop = COST.run_per_token(batch, prompt, new)
    decode_context = prompt + new / 2  # the decode steps attend to prompt + 1 ... prompt + new - 1 positions
    prefill_flops = batch * prompt * COST.flops_per_token(prompt / 2)
    decode_flops = (new - 1) * batch * COST.flops_per_token(decode_context)
    assert per_flop * batch * new == pytest.approx(prefill_flops + decode_flops)
    assert per_flop > 1.25 * COST.flops_per_token(decode_context)  # decode-only accounting would miss the prefill
    prefill_bytes = COST.params * 4  # one pass over the weights for the whole prompt batch
    decode_bytes = (new - 1) * batch * COST.bytes_per_token(batch, decode_context)
    assert per_byte * batch * new == pytest.approx(prefill_bytes + decode_bytes)


def test_bandwidth_probes_between_runs_set_the_host_bandwidth_to_their_best_and_print_the_spread(monkeypatch):
    monkeypatch.setattr(roofline, "measure_host", lambda shapes, dtype, platform: limits(bandwidth=25e9))
    from types import SimpleNamespace

    from rollout.bench import checkpoints
    from rollout.models.config import ModelConfig

    cfg = ModelConfig.from_hf(checkpoints.shape_config("tiny"))
    args = SimpleNamespace(batches=[1], prompt_len=8, new_tokens=4)
    rows = [dict(batch=1, rollout_tok_s=10.0, rollout_decode_tok_s=12.0, ratio=1.0)]
    host_json, lines = roofline.roofline_table(cfg, 10_000, args, rows, [("rollout", "rollout_tok_s", "ratio")],
                                               bandwidth_samples=[30e9, 20e9])
    assert rows[0]["roofline"]["basis"] == "decode" and rows[0]["roofline"]["rate_tok_s"] == 12.0
    assert host_json["memory_bandwidth_bytes_s"] == 30e9
    assert host_json["memory_bandwidth_spread_bytes_s"] == [20e9, 30e9]
    assert "ranged 20.0-30.0" in lines[1]
    assert rows[0]["roofline"]["bandwidth_fraction"] == pytest.approx(rows[0]["roofline"]["bytes_s"] / 30e9)


def test_fraction_rejects_a_capacity_that_is_not_a_positive_rate():
    with pytest.raises(ValueError, match="positive rate"):
        roofline.fraction(1.0, 1.0, 0.0)


def test_host_limits_json_names_the_cpu_bandwidth_and_peak_library():
    data = limits(torch_rate=50e9).to_json()
    assert data["cpu_model"] == "test cpu" and data["memory_bandwidth_bytes_s"] == 20e9
    assert data["matmul_peak_library"] == "jax" and data["matmul_peak_flops_s"] == 100e9
    assert [m["library"] for m in data["matmul"]] == ["jax", "torch"]


def test_roofline_lines_print_the_host_and_one_row_per_entry_with_its_percentages():
    host_limits = limits()
    fields = roofline.roofline_fields(COST, host_limits, batch=1, tok_s=2000.0, prompt_len=1, new_tokens=1)  # 8 GB/s: 40%
    lines = roofline.roofline_lines(host_limits, [dict(label="rollout", batch=1, tok_s=2000.0, ratio=1.25, **fields)])
    assert lines[0] == "host: test cpu, 2 cores, avx2"
    assert "20.0 GB/s" in lines[1] and "torch 150.0 GFLOP/s" in lines[1]
    assert lines[-1].split() == ["rollout", "1", "2000.0", "run", "2000.0", "8.0", "40%", "4.0", "3%", "1.25x"]


MOE = DecodeCost(params=1_000_000, num_layers=4, num_heads=16, num_kv_heads=4, head_dim=128,
                 expert_params=800_000, num_experts=32, experts_per_token=4)


def test_a_mixture_of_experts_reads_the_experts_its_batch_routes_to_and_all_at_a_large_batch():
    assert MOE.params_read(1) == pytest.approx(200_000 + 800_000 * 4 / 32)
    assert MOE.params_read(8) < MOE.params_read(64) < 1_000_000
    assert MOE.params_read(1024) == pytest.approx(1_000_000)


def test_a_mixture_of_experts_computes_only_each_tokens_top_k():
    assert MOE.flops_per_token(0) == pytest.approx(2 * (200_000 + 800_000 * 4 / 32))


def test_decode_cost_of_a_moe_config_counts_the_expert_weights_of_its_sparse_layers():
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_layers=4, num_heads=16, num_kv_heads=4, head_dim=128, hidden_size=1024,
                          moe_layers=(0, 1, 2, 3), num_experts=32, num_experts_per_tok=4, moe_intermediate_size=384)
    cost = DecodeCost.of(cfg, params=200_000_000)
    assert cost.expert_params == 4 * 32 * 3 * 1024 * 384
    assert (cost.num_experts, cost.experts_per_token) == (32, 4)
