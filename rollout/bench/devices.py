"""Where a benchmark runs: `--platform cpu|gpu|tpu` for JAX, and the device of its torch reference.

`use_platform` must run before JAX initialises its backend (the benchmark's first device query):

- cpu (the default): JAX_PLATFORMS=cpu, as the benchmarks always ran; torch on the CPU.
- gpu: JAX_PLATFORMS=cuda (fails at the first device query where JAX sees no GPU, rather than
  measuring the CPU by mistake) and XLA_PYTHON_CLIENT_PREALLOCATE=false: JAX would otherwise
  take 75% of the GPU's memory at start, leaving the torch reference on the same GPU too
  little for an 8B model. torch (transformers) on "cuda".
- tpu: JAX_PLATFORMS=tpu; torch has no TPU here, so its reference runs on the host's CPU.

A variable already set in the environment is left as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Platform:
    name: str  # the --platform value
    jax_platforms: str  # JAX_PLATFORMS
    torch_device: str  # where the transformers reference runs
    default_dtype: str  # of the weights and KV cache when --dtype is not given
    env: tuple[tuple[str, str], ...] = ()  # further variables set before JAX starts


PLATFORMS: dict[str, Platform] = {
    "cpu": Platform("cpu", "cpu", "cpu", "float32"),
    "gpu": Platform("gpu", "cuda", "cuda", "bfloat16", (("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),)),
    "tpu": Platform("tpu", "tpu", "cpu", "bfloat16"),
}


def use_platform(name: str) -> Platform:
    """Set the environment JAX reads at start for platform `name` (see the module docstring)."""
    if name not in PLATFORMS:
        raise ValueError(f"platform {name!r}: expected one of {sorted(PLATFORMS)}")
    platform = PLATFORMS[name]
    os.environ.setdefault("JAX_PLATFORMS", platform.jax_platforms)
    for key, value in platform.env:
        os.environ.setdefault(key, value)
    return platform


def synchronize(torch: Any, device: str) -> None:
    """Wait for the work queued on torch's `device` (a no-op on the CPU, which runs it eagerly)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def describe(platform: Platform, cores: int) -> str:
    """The words the benchmark's model line uses for where it ran.

    >>> describe(PLATFORMS["cpu"], 2)
    'CPU (2 cores)'
    """
    if platform.name == "cpu":
        return f"CPU ({cores} cores)"
    return f"{platform.name.upper()} {accelerator_name(platform.torch_device)}"


def accelerator_name(torch_device: str = "cpu") -> str:
    """The accelerator JAX runs on, by its device_kind, and torch's CUDA device where torch runs
    on one, e.g. 'NVIDIA H100 80GB HBM3 x1 (torch: NVIDIA H100 80GB HBM3)'."""
    import jax

    devices = jax.devices()
    name = f"{devices[0].device_kind} x{len(devices)}"
    if torch_device.startswith("cuda"):
        import torch

        name += f" (torch: {torch.cuda.get_device_name(torch.device(torch_device))})"
    return name
