"""What the sglang-jax backend needs before an engine starts, each refused with a clear error.

Checked in this order, before anything is loaded: the Python version (sglang-jax 0.0.2 requires
>= 3.12), sglang-jax installed (and which version), the `msgpack` module being msgpack >= 1
(Ray's and the manifest code's; sglang-jax 0.0.2 drags in msgpack-python 0.5.6, which installs
the same module), the swap policy, and the checkpoint's architecture and head_dim.
"""

from __future__ import annotations

import sys
from importlib import metadata

from rollout.engine.backend import EngineCapabilities, FeatureUnavailableError
from rollout.models.config import ModelConfig

# head_dim must be a multiple of this (sglang-jax pads smaller head dims, so no sync could fit);
# refused at start (check_head_dim); the demo sizes its built-in model by it (the package exports it).
HEAD_DIM_MULTIPLE = 128

SUPPORTED_VERSIONS = ("0.0.2",)
SWAP_POLICIES = ("drain",)  # what this backend can honour; see check_swap_policy
INSTALL_HINT = (
    'install it with `pip install -e ".[sglang]"` (or `pip install sglang-jax==0.0.2`) in a Python >= 3.12 '
    'environment, then `pip install --force-reinstall --no-deps "msgpack>=1.0,<2"`; on a host without '
    "Python 3.12, `.ci/sglang_root.sh build` makes a Debian 13 root with Python 3.13 that has it"
)


class BackendUnavailableError(RuntimeError):
    """The sglang-jax backend cannot run here (Python, package, or module versions)."""


class LogprobsUnavailableError(FeatureUnavailableError):
    """The installed sglang-jax cannot return logprobs on this platform."""


def logprobs_message(version: str = "0.0.2", platform: str = "cpu") -> str:
    return (
        f"return_logprobs=True is not available with engine='sglang-jax' (sglang-jax {version} crashes its "
        f"scheduler when asked for logprobs on {platform}); pass return_logprobs=False, or use "
        "engine='native' for logprobs"
    )


def logprobs_unavailable(version: str = "0.0.2", platform: str = "cpu") -> LogprobsUnavailableError:
    return LogprobsUnavailableError(logprobs_message(version, platform))


def score_message(version: str = "0.0.2") -> str:
    return (
        f"score() is not available with engine='sglang-jax' (sglang-jax {version} has no teacher-forced "
        "logprob call, and its logprob path crashes on CPU); score on a fleet with engine='native'"
    )


def routed_experts_message(version: str = "0.0.2") -> str:
    return (
        f"return_routed_experts / routing replay is not available with engine='sglang-jax' (this backend "
        f"serves dense models only with sglang-jax {version}); use engine='native'"
    )


def hidden_states_message(version: str = "0.0.2") -> str:
    return (
        f"score(..., return_hidden_states=...) is not available with engine='sglang-jax' (sglang-jax {version} "
        "has no teacher-forced scoring call to return activations from); use engine='native'"
    )


def top_logprobs_message(version: str = "0.0.2", platform: str = "cpu") -> str:
    return (
        f"top_logprobs is not available with engine='sglang-jax': sglang-jax {version} returns top-k "
        f"alternatives only on its logprob path (top_logprobs_num), which crashes its scheduler on {platform}, "
        "so this adapter reads no logprobs; send top_logprobs=0, or use engine='native'"
    )


def structured_output_message() -> str:
    return (
        "structured output (SamplingParams json_schema / regex / grammar) is not available with "
        "engine='sglang-jax': this adapter passes no constraints to it; use engine='native'"
    )


def capabilities(version: str, platform: str) -> EngineCapabilities:
    """What this backend cannot do, and why (the coordinator refuses those requests up front)."""
    return EngineCapabilities(
        unavailable={
            "logprobs": logprobs_message(version, platform),
            "score": score_message(version),
            "routed_experts": routed_experts_message(version),
            "hidden_states": hidden_states_message(version),
            "top_logprobs": top_logprobs_message(version, platform),
            "structured_output": structured_output_message(),
        }
    )


def check_architecture(config: ModelConfig) -> None:
    """Mixture-of-experts checkpoints are refused: whether sglang-jax 0.0.2 serves Qwen3-MoE was not
    verified, and this adapter's state mapping and weight sync know dense layers only."""
    if config.is_moe:
        raise ValueError(
            f"{config.architecture} (a mixture-of-experts model, {config.num_experts} experts) cannot be "
            "served by engine='sglang-jax': this backend is verified with dense Qwen models only (its "
            "weight mapping has no stacked experts); use engine='native', which serves Qwen3-MoE"
        )


def check_python(version_info: tuple[int, ...] = sys.version_info[:2]) -> None:
    if tuple(version_info[:2]) < (3, 12):
        raise BackendUnavailableError(
            f"engine='sglang-jax' needs Python >= 3.12 (sglang-jax 0.0.2 requires it); this is Python "
            f"{version_info[0]}.{version_info[1]}. Use engine='native' here, or {INSTALL_HINT}"
        )


def installed_version() -> str:
    """The installed sglang-jax version; BackendUnavailableError saying how to install it if none."""
    try:
        version = metadata.version("sglang-jax")
    except metadata.PackageNotFoundError:
        raise BackendUnavailableError(f"engine='sglang-jax' needs the sglang-jax package, which is not installed; {INSTALL_HINT}") from None
    if version not in SUPPORTED_VERSIONS:
        raise BackendUnavailableError(
            f"sglang-jax {version} is installed; this backend is written and tested against "
            f"{', '.join(SUPPORTED_VERSIONS)} (its model state and scheduler hooks are version specific); "
            "install sglang-jax==0.0.2"
        )
    return version


def runs_here() -> bool:
    """Whether this Python can run sglang-jax itself (>= 3.12 with sglang-jax installed): what the
    Python 3.13 root provides and a Python 3.11 host lacks."""
    try:
        check_python()
        installed_version()
    except BackendUnavailableError:
        return False
    return True


def check_msgpack() -> None:
    import msgpack

    if tuple(msgpack.version[:1]) < (1,):
        raise BackendUnavailableError(
            f"the `msgpack` module is {'.'.join(map(str, msgpack.version))} (from msgpack-python, which "
            "sglang-jax 0.0.2 requires); Ray and rollout's update manifests need msgpack >= 1. sglang-jax "
            'never imports msgpack at run time, so reinstall it last: `pip install --force-reinstall --no-deps "msgpack>=1.0,<2"`'
        )


def check_swap_policy(policy: str) -> None:
    """sglang-jax 0.0.2 can hold new requests while its running ones finish (drain), but it has no
    way to re-prefill running requests on new weights (recompute) and its radix cache would keep
    their old-weight KV for later prompts (continue)."""
    if policy not in SWAP_POLICIES:
        raise ValueError(
            f"swap_policy={policy!r} is not available with engine='sglang-jax': it supports "
            f"{', '.join(repr(p) for p in SWAP_POLICIES)} (running requests finish on the old weights, new ones "
            "wait for the swap); 'recompute' and 'continue' work with engine='native'"
        )


def check_head_dim(config: ModelConfig) -> None:
    if config.head_dim % HEAD_DIM_MULTIPLE:
        raise ValueError(
            f"head_dim={config.head_dim} cannot be served by engine='sglang-jax': sglang-jax pads head "
            f"dims to a multiple of {HEAD_DIM_MULTIPLE}, so its state's shapes differ from the checkpoint's "
            "and no weight sync could fit; use a checkpoint whose head_dim is a multiple of 128 "
            "(Qwen3 models are), or engine='native'"
        )


def check_quantization(quantization: str | None) -> None:
    """The native engine quantizes at placement (rollout.engine.quantized); this adapter hands
    full-precision leaves to sglang-jax's model state and has no quantized path."""
    if quantization is not None:
        raise ValueError(
            f"quantization={quantization!r} is not available with engine='sglang-jax' (it serves the --dtype "
            "weights); use engine='native' for int8 weights, or quantization=None"
        )
