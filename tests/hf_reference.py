"""The numerical reference for tests: transformers' PyTorch Qwen on the same checkpoint."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: str | Path, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, EOS ignored (exactly max_new_tokens new tokens)."""
    import torch

    model = hf_model(str(path))
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()
