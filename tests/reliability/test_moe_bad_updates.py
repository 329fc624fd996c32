"""Bad weight updates against a live mixture-of-experts fleet (2 workers x 2 simulated devices,
the experts split over each worker's devices; a tiny Qwen3-MoE that transformers wrote): a NaN
in one expert, a wrong expert count and a missing expert are refused with a clear error naming
the tensor, every worker goes on serving the previous version bit for bit, and no request in
flight meanwhile is lost or answered twice. The cases and checks are the dense suite's
(bad_updates.py, harness.py); only the updates are MoE's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import rollout
from rollout.weights.spec import SpecMismatchError

from .bad_updates import BadUpdate, try_bad_update
from .harness import FLEET, engine_params, fingerprint

pytest.importorskip("torch")

pytestmark = pytest.mark.ray

EXPERTS = 8  # moe_reference.TINY_MOE: 8 experts of (hidden 64, inter 32), top 2, 3 MoE layers
HF_EXPERT = "model.layers.0.mlp.experts"


def _nan_in_one_expert(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    leaf = params["layers.0.mlp.experts.down_proj"].copy()  # (experts, inter, hidden)
    leaf[3, 0, 0] = np.nan
    return {**params, "layers.0.mlp.experts.down_proj": leaf}


def _per_expert(checkpoint: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by HF name, one per expert (as save_pretrained wrote them)."""
    from safetensors.numpy import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def moe_bad_updates(checkpoint: Path) -> list[BadUpdate]:
    per_expert = _per_expert(checkpoint)
    return [
        BadUpdate("nan_in_one_expert", rollout.NonFiniteWeightsError,
                  "layers.0.mlp.experts.down_proj: 1 non-finite value(s)",
                  lambda svc, p: svc.sync_weights(_nan_in_one_expert(p))),
        BadUpdate("one_expert_too_few", SpecMismatchError,
                  f"layers.0.mlp.experts.up_proj: expected shape ({EXPERTS}, 64, 32), got ({EXPERTS - 1}, 64, 32)",
                  lambda svc, p: svc.sync_weights({**p, "layers.0.mlp.experts.up_proj": p["layers.0.mlp.experts.up_proj"][:-1]})),
        BadUpdate("expert_beyond_the_count", SpecMismatchError, f"{HF_EXPERT}.{EXPERTS}.down_proj.weight",
                  lambda svc, p: svc.sync_weights(
                      {**per_expert, f"{HF_EXPERT}.{EXPERTS}.down_proj.weight": per_expert[f"{HF_EXPERT}.0.down_proj.weight"]})),
        BadUpdate("missing_expert", SpecMismatchError, f"{HF_EXPERT}.2.up_proj.weight",
                  lambda svc, p: svc.sync_weights({k: v for k, v in per_expert.items() if k != f"{HF_EXPERT}.2.up_proj.weight"})),
    ]


CASES = ("nan_in_one_expert", "one_expert_too_few", "expert_beyond_the_count", "missing_expert")


@pytest.fixture(scope="module")
def checkpoint(tiny_moe: Path) -> Path:
    return tiny_moe


@pytest.fixture(scope="module")
def params(checkpoint) -> dict[str, np.ndarray]:
    return engine_params(checkpoint)


@pytest.fixture(scope="module")
def fleet(ray_local, checkpoint, params):
    with rollout.RolloutService(checkpoint, **FLEET) as svc:
        assert svc.sync_weights(params) == 1
        yield svc


@pytest.fixture(scope="module")
def baseline(fleet) -> list[tuple]:
    return fingerprint(fleet)


def test_the_moe_fleet_splits_the_experts_and_both_workers_serve_the_same_greedy_outputs(fleet, baseline):
    assert FLEET["devices_per_worker"] > 1 and EXPERTS % FLEET["devices_per_worker"] == 0  # expert-parallel
    per_worker: dict[int, list] = {}
    for worker, tokens, logprobs, version in baseline:
        per_worker.setdefault(worker, []).append((tokens, logprobs, version))
    assert len(per_worker) == 2 and per_worker[0] == per_worker[1]


@pytest.mark.parametrize("name", CASES)
def test_a_bad_moe_update_is_refused_naming_the_tensor_and_the_old_version_serves_bit_for_bit(
    fleet, checkpoint, params, baseline, name
):
    (case,) = [c for c in moe_bad_updates(checkpoint) if c.name == name]
    out = try_bad_update(fleet, case, params)
    assert out.clear, f"expected {case.error} with {case.fragment!r}, got {out.error_type}: {out.message}"
    assert (out.lost, out.duplicates) == (0, 0), out.details
    assert out.served_versions == {out.version_before}
    assert fleet.version == out.version_before and out.worker_versions == {out.version_before}
    assert out.details["staged"] == [None, None]
    assert out.fingerprint == baseline


def test_the_next_good_moe_update_after_the_bad_ones_is_the_next_version(fleet, params, baseline):
    before = fleet.version
    assert fleet.sync_weights(params) == before + 1
    assert [(w, t, lp) for w, t, lp, _ in fingerprint(fleet)] == [(w, t, lp) for w, t, lp, _ in baseline]
