"""LoRA adapters: PEFT's forms parsed and checked against the base model, as flat factors.

An adapter changes each targeted linear layer as `W = W_base + scale * B @ A` (HF layout,
W (out, in)), with A (r, in), B (out, r) and `scale` = alpha / r (alpha / sqrt(r) with rsLoRA).
Accepted forms, all ending as one `LoraAdapter` (PEFT tensor names + LoraConfig):

    LoraAdapter.from_peft_dir("step_100/")          # adapter_config.json + adapter_model.safetensors
    LoraAdapter.from_peft(tensors, config)          # {PEFT name: array} + adapter_config dict / LoraConfig

PEFT names look like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (a live
PeftModel's state_dict adds the adapter name: `...lora_A.default.weight`). What crosses to the
workers is the adapter's *factors*: `{kernel path + ":lora_A": A (r, in), kernel path +
":lora_B": B (out, r)}` keyed by the engine path of the base kernel (rollout.weights.hf_names),
plus the config's numbers in the bucket manifest (`LoraConfig.to_meta`). `check_factors` is the
one validation, run by the coordinator before any byte moves and again by every engine: every
targeted module is a linear layer of the base, A is (r, in), B is (out, r), one rank, floating
and finite values.

No jax here: the coordinator imports this.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rollout.weights.finite import count_non_finite, is_floating
from rollout.weights.hf_names import TRANSPOSE
from rollout.weights.spec import ParamSpec, SpecMismatchError

FACTOR_A = ":lora_A"  # suffix of an A factor's path: A (r, in)
FACTOR_B = ":lora_B"  # suffix of a B factor's path: B (out, r)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"  # PEFT's target_modules shorthand: every linear layer but the output head

# base_model.model.<module>.lora_A[.<adapter name>].weight
_PEFT_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# PEFT options this merge does not implement: (key, the value that is fine, why refused)
_UNSUPPORTED = (
    ("use_dora", False, "DoRA adapters are not supported; train a plain LoRA adapter (use_dora=False)"),
    ("fan_in_fan_out", False, "fan_in_fan_out=True is for Conv1D layers, which this model does not have"),
    ("bias", "none", "adapters that train biases (bias != 'none') are not supported; use bias='none'"),
)


class LoraAdapterError(SpecMismatchError):
    """A LoRA adapter that does not fit the base model, or an adapter form that is not supported."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What PEFT's adapter_config.json says about the merge: one rank, alpha, rsLoRA, targets.

    >>> LoraConfig(rank=16, alpha=32).scale
    2.0
    >>> LoraConfig(rank=16, alpha=32, use_rslora=True).scale
    8.0
    """

    rank: int
    alpha: float
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    # module names (a module is targeted when its name ends with one), a regex matched against
    # the whole module name, or "all-linear"; () takes the modules the tensors name
    target_modules: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise LoraAdapterError(f"LoRA rank r={self.rank!r}: expected a positive integer")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise LoraAdapterError(f"lora_alpha={self.alpha!r}: expected a finite number")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_peft(cls, config: Mapping[str, Any]) -> LoraConfig:
        """From the dict of a PEFT adapter_config.json (or LoraConfig.to_dict()); refuses the
        options this merge does not implement (DoRA, per-module ranks, biases, extra modules)."""
        if config.get("peft_type", "LORA") not in ("LORA", "PeftType.LORA"):
            raise LoraAdapterError(f"peft_type={config.get('peft_type')!r}: expected a LORA adapter")
        for key, fine, why in _UNSUPPORTED:
            if config.get(key, fine) not in (fine, None):
                raise LoraAdapterError(f"{key}={config[key]!r}: {why}")
        for key in ("rank_pattern", "alpha_pattern"):
            if config.get(key):
                raise LoraAdapterError(
                    f"{key}={config[key]!r}: one rank and alpha per adapter are supported; train with "
                    f"an empty {key}"
                )
        if config.get("modules_to_save"):
            raise LoraAdapterError(
                f"modules_to_save={config['modules_to_save']!r}: only LoRA factors are synced as an adapter; "
                "sync the full weights (sync_weights of the merged model) to change other modules"
            )
        if "r" not in config or "lora_alpha" not in config:
            raise LoraAdapterError(f"expected 'r' and 'lora_alpha' in the adapter config, got keys {sorted(config)}")
        targets = config.get("target_modules") or ()
        return cls(
            rank=config["r"],
            alpha=float(config["lora_alpha"]),
            use_rslora=bool(config.get("use_rslora", False)),
            target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
        )

    def to_meta(self) -> dict[str, Any]:
        """What a bucket manifest carries (msgpack: plain numbers and a bool)."""
        return {"kind": "lora", "rank": self.rank, "alpha": float(self.alpha), "use_rslora": self.use_rslora}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> LoraConfig:
        if not isinstance(meta, Mapping) or meta.get("kind") != "lora":
            raise LoraAdapterError(f"expected a LoRA adapter's manifest entry {{'kind': 'lora', ...}}, got {meta!r}")
        return cls(rank=int(meta["rank"]), alpha=float(meta["alpha"]), use_rslora=bool(meta["use_rslora"]))


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter as PEFT names it: `tensors` {PEFT name: array (numpy, jax or torch-free
    array-likes)} and its `config`. `sync_weights(adapter)` sends only these factors."""

    tensors: Mapping[str, Any]
    config: LoraConfig

    @classmethod
    def from_peft(cls, tensors: Mapping[str, Any], config: LoraConfig | Mapping[str, Any]) -> LoraAdapter:
        """`tensors` in PEFT names with the adapter's config (a LoraConfig, or the dict of
        adapter_config.json)."""
        if not isinstance(config, LoraConfig):
            config = LoraConfig.from_peft(config)
        if not isinstance(tensors, Mapping) or not tensors:
            raise LoraAdapterError(f"expected a non-empty dict of PEFT tensor names, got {type(tensors).__name__}")
        return cls(dict(tensors), config)

    @classmethod
    def from_peft_dir(cls, path: str | os.PathLike[str]) -> LoraAdapter:
        """A PEFT adapter directory (what `peft_model.save_pretrained(path)` writes)."""
        directory = Path(path).expanduser()
        config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
        if not config_file.is_file() or not weights_file.is_file():
            raise LoraAdapterError(
                f"{directory}: expected a PEFT adapter directory with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                "(peft_model.save_pretrained writes them; a .bin adapter must be re-saved with safe_serialization)"
            )
        from safetensors.numpy import load_file

        return cls.from_peft(load_file(str(weights_file)), json.loads(config_file.read_text(encoding="utf-8")))

    def factors(self, spec: ParamSpec) -> dict[str, Any]:
        """The factors in engine paths (module docstring), checked against `spec` (the base
        model's, with its HF name table). Raises LoraAdapterError before anything is sent."""
        if spec.hf is None:
            raise LoraAdapterError("the model spec has no HF name table to map the adapter's module names with")
        kernels = {path for path in spec.paths if path.endswith(".kernel")}
        flat: dict[str, Any] = {}
        modules: dict[str, str] = {}  # module name -> kernel path
        adapters: set[str] = set()
        for name, array in self.tensors.items():
            match = _PEFT_NAME.fullmatch(name)
            if match is None:
                raise LoraAdapterError(
                    f"{name!r} is not a LoRA factor: expected PEFT names such as "
                    "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' (embedding adapters, "
                    "DoRA magnitudes and modules_to_save are not supported)"
                )
            module, factor = match["module"], match["factor"]
            adapters.add(match["adapter"] or "")
            target = spec.hf.to_path(f"{module}.weight")
            if target is None or target[0] not in kernels or target[1] != TRANSPOSE:
                raise LoraAdapterError(
                    f"{name!r}: module {module!r} is not a linear layer of this model; expected one of "
                    f"{_examples(spec, kernels)}"
                )
            modules[module] = target[0]
            flat[target[0] + (FACTOR_A if factor == "A" else FACTOR_B)] = array
        if len(adapters) > 1:
            raise LoraAdapterError(f"tensors of several adapters {sorted(adapters)}: send one adapter at a time")
        _check_targets(self.config.target_modules, set(modules), spec, kernels)
        check_factors(flat, spec, self.config.rank)
        return flat


def _examples(spec: ParamSpec, kernels: set[str]) -> str:
    assert spec.hf is not None
    names = sorted(spec.hf.to_hf(p)[0].removesuffix(".weight") for p in kernels)
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def linear_modules(spec: ParamSpec) -> dict[str, str]:
    """{HF module name: engine kernel path} of every linear layer of the base (the targets an
    adapter may have)."""
    assert spec.hf is not None
    out = {}
    for path in spec.paths:
        if path.endswith(".kernel"):
            name, transform = spec.hf.to_hf(path)
            if transform == TRANSPOSE:
                out[name.removesuffix(".weight")] = path
    return out


def _targeted(targets: tuple[str, ...] | str, module: str) -> bool:
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            return not module.endswith("lm_head")
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_targets(targets: tuple[str, ...] | str, sent: set[str], spec: ParamSpec, kernels: set[str]) -> None:
    """The config's target modules exist in the base, and the tensors are exactly the factors of
    the modules they target (an adapter with a module missing would serve half-applied)."""
    if not targets:
        return
    linear = linear_modules(spec)
    targeted = {m for m in linear if _targeted(targets, m)}
    if not isinstance(targets, str):
        absent = [t for t in targets if not any(_targeted((t,), m) for m in linear)]
        if absent:
            raise LoraAdapterError(
                f"target_modules {absent} name no linear layer of this model; its linear layers are "
                f"{_examples(spec, kernels)}"
            )
    if not targeted:
        raise LoraAdapterError(f"target_modules={targets!r} matches no linear layer of this model")
    extra, missing = sorted(sent - targeted), sorted(targeted - sent)
    if extra or missing:
        raise LoraAdapterError(
            f"the adapter's tensors do not match its target_modules={targets!r}: "
            + "; ".join(
                part for part in (
                    f"{len(missing)} targeted module(s) without factors, e.g. {missing[:3]}" if missing else "",
                    f"{len(extra)} module(s) with factors but not targeted, e.g. {extra[:3]}" if extra else "",
                ) if part
            )
            + ". Send the whole adapter (every targeted module's lora_A and lora_B)"
        )


def split_factor(path: str) -> tuple[str, str]:
    """A factor's path -> (kernel path, "A" or "B").

    >>> split_factor("layers.0.mlp.up_proj.kernel:lora_B")
    ('layers.0.mlp.up_proj.kernel', 'B')
    """
    for suffix, factor in ((FACTOR_A, "A"), (FACTOR_B, "B")):
        if path.endswith(suffix):
            return path[: -len(suffix)], factor
    raise LoraAdapterError(f"{path!r} is not a LoRA factor path (expected a kernel path + {FACTOR_A!r} or {FACTOR_B!r})")


def check_factors(
    flat: Mapping[str, Any], spec: ParamSpec, rank: int, *, check_finite: bool = True
) -> dict[str, tuple[Any, Any]]:
    """{kernel path: (A, B)} of `flat` (factor paths), refusing anything that does not fit the
    base of `spec`: an unknown kernel, a module with one factor, A not (r, in), B not (out, r),
    another rank than `rank`, a non-floating dtype, NaN/Inf (unless `check_finite=False`: the
    values were counted already). Shapes and dtypes are read without touching the data."""
    want = spec.by_path()
    pairs: dict[str, dict[str, Any]] = {}
    for path, array in flat.items():
        kernel, factor = split_factor(path)
        leaf = want.get(kernel)
        if leaf is None or len(leaf.shape) != 2 or not kernel.endswith(".kernel"):
            raise LoraAdapterError(f"{path}: {kernel!r} is not a linear kernel of this model")
        pairs.setdefault(kernel, {})[factor] = array
    if not pairs:
        raise LoraAdapterError("the adapter has no factors: expected lora_A and lora_B of at least one module")
    out = {}
    for kernel, both in pairs.items():
        if set(both) != {"A", "B"}:
            lacking = "lora_B" if "A" in both else "lora_A"
            raise LoraAdapterError(f"{kernel}: {lacking} is missing; every module needs both lora_A and lora_B")
        d_in, d_out = want[kernel].shape  # engine kernels are (in, out)
        a, b = both["A"], both["B"]
        for name, array, shape in (("lora_A", a, (rank, d_in)), ("lora_B", b, (d_out, rank))):
            got = tuple(int(d) for d in getattr(array, "shape", ()))
            if got != shape:
                raise LoraAdapterError(
                    f"{kernel}: {name} expected shape {shape} ({'(r, in)' if name == 'lora_A' else '(out, r)'} with "
                    f"r={rank}), got {got}; one rank per adapter, factors in PEFT's layout"
                )
            dtype = np.dtype(getattr(array, "dtype", np.float32))
            if not is_floating(dtype):
                raise LoraAdapterError(f"{kernel}: {name} expected a floating dtype, got {dtype.name}")
        out[kernel] = (a, b)
    if check_finite:
        for kernel, (a, b) in out.items():
            for name, array in (("lora_A", a), ("lora_B", b)):
                bad = count_non_finite(np.asarray(array))
                if bad:
                    raise LoraAdapterError(
                        f"{kernel}: {name} holds {bad} non-finite value(s) (NaN or Inf); refusing the adapter. "
                        "Check the trainer's loss and gradients for this step."
                    )
    return out


def factors_spec(flat: Mapping[str, Any]) -> ParamSpec:
    """The spec of the factors as they are sent (each in its own floating dtype, bfloat16 included)."""
    return ParamSpec.of({path: np.asarray(array) if not hasattr(array, "dtype") else array for path, array in flat.items()})


def is_adapter_dir(params: Any) -> bool:
    """Whether `params` is a path to a PEFT adapter directory (rather than an HF checkpoint)."""
    if not isinstance(params, (str, os.PathLike)):
        return False
    return (Path(params).expanduser() / ADAPTER_CONFIG).is_file()


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """An adapter as it is sent: `factors` {factor path: array} (module docstring) and its config
    (rank, alpha, rsLoRA; a sync's manifest carries them as `LoraConfig.to_meta`)."""

    factors: Mapping[str, Any]
    config: LoraConfig


def adapter_factors(adapter: LoraAdapter | LoraFactors, spec: ParamSpec) -> LoraFactors:
    """`adapter` in engine paths (a LoraAdapter is mapped and checked against `spec`)."""
    if isinstance(adapter, LoraFactors):
        return adapter
    if isinstance(adapter, LoraAdapter):
        return LoraFactors(adapter.factors(spec), adapter.config)
    raise TypeError(
        f"expected a LoRA adapter (rollout.LoraAdapter, e.g. LoraAdapter.from_peft_dir(path)), got {type(adapter).__name__}"
    )
