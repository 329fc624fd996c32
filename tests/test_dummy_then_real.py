"""`python -m trainer_stub.dummy_then_real`: dummy weights -> real weights in place -> generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_stub.dummy_then_real import CHAT_PROMPT

MAX_TOKENS = 32


def transformers_greedy(path: Path, max_new_tokens: int) -> tuple[list[int], str]:
    """transformers' greedy reply to CHAT_PROMPT (stopping at the checkpoint's EOS ids)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(CHAT_PROMPT, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens)
    new = out[0, ids.shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def phases(tiny_qwen3: Path) -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_stub.dummy_then_real", "--model", str(tiny_qwen3), "--max-tokens", str(MAX_TOKENS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {line["phase"]: line for line in lines}


def test_prints_the_three_phases_in_order(phases):
    assert list(phases) == ["engine_ready_dummy", "weights_swapped", "generate_result"]


def test_the_swap_keeps_the_tree_and_compiles_nothing(phases):
    ready, swapped, result = phases["engine_ready_dummy"], phases["weights_swapped"], phases["generate_result"]
    assert ready["leaves"] == swapped["leaves"] == 24  # tiny Qwen3: 2 layers x 11 + embed + norm
    assert ready["version"] == 0 and swapped["version"] == 1 and result["weight_version"] == 1
    assert swapped["shapes_unchanged"] and swapped["leaves_unchanged"]
    assert result["compiled_after"] == result["compiled_before"] and not result["recompiled"]


def test_the_reply_equals_transformers_greedy_output(phases, tiny_qwen3):
    token_ids, text = transformers_greedy(tiny_qwen3, MAX_TOKENS)
    result = phases["generate_result"]
    assert result["token_ids"] == token_ids
    assert result["text"] == text
