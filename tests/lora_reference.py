"""The LoRA reference for tests: PEFT adapters on transformers' model of a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(base: Path, seed: int, rank: int = 4, alpha: float = 8.0, rslora: bool = False):
    """transformers' float32 model of `base` with a random (nonzero) PEFT LoRA adapter."""
    import peft
    import torch

    from hf_reference import hf_model

    torch.manual_seed(seed)
    model = type(hf_model(str(base))).from_pretrained(str(base), dtype=torch.float32).eval()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS,
                             init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)  # keep the merged weights near the base's scale
    return wrapped.eval()


def save_adapter(wrapped, directory: Path) -> Path:
    wrapped.save_pretrained(str(directory))
    return directory
