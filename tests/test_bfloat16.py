"""bfloat16 serving is as accurate as transformers in bfloat16.

Both run the same checkpoint in bfloat16 and are compared with transformers in float32 (the
exact function): the engine's full-sequence logits may be no further from it than 1.5x
transformers' own bfloat16 error, on 1 and on 4 devices. A cast in the wrong place (a softmax
or norm in bfloat16, a float32 weight left behind) shows as a larger error, or as a dtype check.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from rollout.engine import EngineConfig
from rollout.engine.native.engine import Engine
from rollout.models import forward
from rollout.testing import make_tiny_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = np.random.default_rng(0).integers(3, 440, (3, 24)).astype(np.int32)
VARIANTS = {
    "qwen3-tied": ("Qwen3ForCausalLM", {}),
    "qwen2-untied-bias": ("Qwen2ForCausalLM", {"tie_word_embeddings": False}),
}


def hf_logits(path: Path, dtype) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(TOKENS.astype(np.int64))).logits.float().numpy()


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory) -> tuple[Path, np.ndarray, float]:
    """(checkpoint, transformers' float32 logits, transformers' bfloat16 error)."""
    architecture, overrides = VARIANTS[request.param]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("bf16") / request.param, architecture, seed=1, **overrides)
    exact = hf_logits(path, torch.float32)
    return path, exact, rel_err(hf_logits(path, torch.bfloat16), exact)


@pytest.mark.parametrize("n_devices", [1, 4])
def test_bfloat16_logits_are_as_close_to_float32_as_transformers_bfloat16(variant, n_devices):
    path, exact, hf_err = variant
    config = EngineConfig(max_batch=2, max_seq_len=64, dtype="bfloat16")
    with Engine(path, config, devices=jax.devices()[:n_devices]) as engine:
        params = engine.current_params()
        assert {str(leaf.dtype) for leaf in params.values()} == {"bfloat16"}
        full_logits_fn = jax.jit(lambda p, t, m: forward.forward_full(engine.model_def.bind(p), t, m))
        ours = np.asarray(full_logits_fn(params, TOKENS, np.ones_like(TOKENS))).astype(np.float32)
    err = rel_err(ours, exact)
    print(f"\n{path.name} {n_devices}dev bfloat16 rel err {err:.3e} (transformers bfloat16 {hf_err:.3e})")
    assert err <= 1.5 * hf_err, f"bfloat16 error {err:.3e} > 1.5 x transformers' {hf_err:.3e}"
