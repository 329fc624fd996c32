"""HF tensor names <-> engine parameter paths: the one mapping the loader, the sync and the spec use.

A model family declares its name table once (`HFNames`, in the family's module, e.g.
`rollout.models.qwen.HF_NAMES`): one `NameRule` per kind of tensor, with `{layer}` standing for
a layer index, and the transform between the two layouts:

    NameRule("model.layers.{layer}.self_attn.q_proj.weight",
             "layers.{layer}.self_attn.q_proj.kernel", TRANSPOSE)   # HF (out, in) -> ours (in, out)

Nothing here imports jax: the coordinator maps a trainer's `{hf_name: array}` dict with the table
that travels inside the fleet's `ParamSpec` (`spec.hf`). Conversion is strict: a name that maps
to no parameter, or two names for one parameter, raise at once. A tied model (no separate output
head) accepts the head's tensor only if it equals the embedding (what `model.state_dict()` of a
tied transformers model holds); a different head is refused, since the model cannot serve it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Collection, Iterator, Mapping

import numpy as np

NONE = "none"  # the same layout on both sides
TRANSPOSE = "transpose"  # a 2-D matrix: HF (out, in) <-> engine (in, out)
TRANSFORMS = (NONE, TRANSPOSE)


class HFNameError(ValueError):
    """Tensor names that do not map onto the model's parameters (unknown, doubled, a wrong tied head)."""


@dataclasses.dataclass(frozen=True)
class NameRule:
    """One kind of tensor: its HF name, its engine path (`{layer}` in both for a layer index)."""

    hf: str
    path: str
    transform: str = NONE

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"{self.hf}: transform={self.transform!r}, expected one of {TRANSFORMS}")


@dataclasses.dataclass(frozen=True)
class HFNames:
    """The name table of one model family (see the module docstring).

    `tied_head` / `tied_to`: the HF names of the output head and of the embedding it shares in
    a model with tie_word_embeddings; `ignored`: a regex of tensors that are not parameters
    (derived buffers some checkpoints carry, e.g. rotary inv_freq).

    >>> table = HFNames((NameRule("model.layers.{layer}.mlp.up_proj.weight",
    ...                            "layers.{layer}.mlp.up_proj.kernel", TRANSPOSE),))
    >>> table.to_path("model.layers.3.mlp.up_proj.weight")
    ('layers.3.mlp.up_proj.kernel', 'transpose')
    >>> table.to_hf("layers.3.mlp.up_proj.kernel")
    ('model.layers.3.mlp.up_proj.weight', 'transpose')
    """

    rules: tuple[NameRule, ...]
    tied_head: str | None = None
    tied_to: str | None = None
    ignored: str = r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$"

    def to_path(self, hf_name: str) -> tuple[str, str] | None:
        """HF tensor name -> (engine path, transform), or None if no rule names it."""
        for rule, (hf_re, _) in zip(self.rules, self._patterns):
            if m := hf_re.fullmatch(hf_name):
                return rule.path.replace("{layer}", m.groupdict().get("layer") or ""), rule.transform
        return None

    def to_hf(self, path: str) -> tuple[str, str]:
        """Engine path -> (HF tensor name, transform). The inverse of `to_path`."""
        for rule, (_, path_re) in zip(self.rules, self._patterns):
            if m := path_re.fullmatch(path):
                return rule.hf.replace("{layer}", m.groupdict().get("layer") or ""), rule.transform
        raise HFNameError(f"engine path {path!r} has no HF name in this family's table; add a NameRule for it")

    def is_ignored(self, hf_name: str) -> bool:
        return re.search(self.ignored, hf_name) is not None

    def tied_head_path(self) -> str | None:
        """The engine path the tied head would have in an untied model (e.g. lm_head.kernel)."""
        target = self.to_path(self.tied_head) if self.tied_head else None
        return target[0] if target else None

    def classify(self, hf_name: str, paths: Collection[str]) -> tuple[str, str, str]:
        """How a model with parameter `paths` takes tensor `hf_name`: (kind, path, transform),
        kind one of "param", "tied" (the head of a tied model: compare with `tied_to`, then
        drop), "ignored", "unknown" (no rule names it: path empty; or it names a path the
        model lacks, such as a layer past the last)."""
        target = self.to_path(hf_name)
        if target is not None and target[0] in paths:
            return "param", target[0], target[1]
        if hf_name == self.tied_head and target is not None:
            return "tied", target[0], target[1]
        if target is None and self.is_ignored(hf_name):
            return "ignored", "", NONE
        return "unknown", target[0] if target else "", target[1] if target else NONE

    def names_of(self, paths: Collection[str]) -> set[str]:
        return {self.to_hf(p)[0] for p in paths}

    @functools.cached_property
    def _patterns(self) -> tuple[tuple[re.Pattern[str], re.Pattern[str]], ...]:
        return tuple((_compile(r.hf), _compile(r.path)) for r in self.rules)


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(re.escape("{layer}"), r"(?P<layer>\d+)"))


def to_engine_layout(array: Any, transform: str) -> Any:
    """An HF-layout tensor in the engine's layout (a view, no copy)."""
    return array.T if transform == TRANSPOSE else array


def tied_head_error(names: HFNames, head_name: str) -> HFNameError:
    return HFNameError(
        f"{head_name!r} differs from {names.tied_to!r}, but this model ties them "
        "(tie_word_embeddings=true in config.json): it has no separate output head. Send "
        f"{head_name!r} equal to {names.tied_to!r}, or leave it out."
    )


def same_values(a: Any, b: Any) -> bool:
    """Whether two tensors hold the same values (NaNs in the same places count as equal)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:  # bit-for-bit, whatever the dtype (bfloat16 included)
        return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))
    return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True))


def hf_to_engine(flat: Mapping[str, Any], names: HFNames, paths: Collection[str]) -> dict[str, Any]:
    """`{hf_name: array}` -> `{engine path: array}` in engine layout, for a model with `paths`.

    Raises HFNameError for names that match no rule of the table, for two names of one
    parameter, and for a tied head that differs from the embedding (one equal to it is
    dropped). A name that maps to a path the model lacks is kept, for the spec check to report.

    >>> table = HFNames((NameRule("model.embed_tokens.weight", "embed_tokens"),
    ...                  NameRule("lm_head.weight", "lm_head.kernel", TRANSPOSE)),
    ...                 tied_head="lm_head.weight", tied_to="model.embed_tokens.weight")
    >>> e = np.ones((4, 2), np.float32)
    >>> list(hf_to_engine({"model.embed_tokens.weight": e, "lm_head.weight": e}, table, {"embed_tokens"}))
    ['embed_tokens']
    """
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    unmapped: list[str] = []
    for name, array in flat.items():
        kind, path, transform = names.classify(name, paths)
        if kind == "tied":  # without the embedding, the spec check reports it missing
            if names.tied_to in flat and not same_values(array, flat[names.tied_to]):
                raise tied_head_error(names, name)
            continue
        if kind == "ignored":
            continue
        if kind == "unknown" and not path:
            unmapped.append(name)
            continue
        # a path this model lacks (say, layer 7 of 2) is kept: the spec check then lists it
        # among the extra paths, beside whatever else is missing or misshapen
        if path in out:
            raise HFNameError(f"tensors {source[path]!r} and {name!r} both set {path!r}; send one")
        out[path], source[path] = to_engine_layout(array, transform), name
    if unmapped:
        shown = ", ".join(unmapped[:8]) + (f", ... ({len(unmapped) - 8} more)" if len(unmapped) > 8 else "")
        example = next(iter(names.names_of(list(paths)[:1])), "")
        raise HFNameError(
            f"{len(unmapped)} tensor name(s) map to no parameter of this model: {shown}; expected "
            f"HF names of its family, such as {example!r}"
        )
    return out


def stream_to_engine(
    tensors: Iterator[tuple[str, Any]],
    names: HFNames,
    paths: Collection[str],
    all_names: Collection[str],
    on_unknown: Callable[[str, Any, str], Exception],
) -> Iterator[tuple[str, str, str, Any]]:
    """(hf_name, array) one at a time -> (hf_name, path, transform, array) of each parameter.

    The loader's form of `hf_to_engine`, for `tensors` whose names are `all_names`. When a tied
    model's checkpoint carries a head copy, whichever of head and embedding comes first is held
    until the other comes and they are compared; nothing else is held.
    `on_unknown(name, array, path)` makes the error for a tensor the model does not take.
    """
    compare = names.tied_head in all_names and names.tied_head_path() not in paths
    held: Any = None
    for name, array in tensors:
        kind, path, transform = names.classify(name, paths)
        if kind == "ignored":
            continue
        if kind == "unknown":
            raise on_unknown(name, array, path)
        if compare and name in (names.tied_head, names.tied_to):
            if held is None:
                held = array
            elif not same_values(array, held):
                raise tied_head_error(names, names.tied_head or "")
            else:
                held = None
        if kind != "tied":
            yield name, path, transform, array
