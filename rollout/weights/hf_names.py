"""HF tensor names <-> engine parameter paths: the one mapping the loader, the sync and the spec use.

A model family declares its name table once (`HFNames`, in the family's module, e.g.
`rollout.models.qwen.HF_NAMES`): one `NameRule` per kind of tensor, with `{layer}` standing for
a layer index, and the transform between the two layouts:

    NameRule("model.layers.{layer}.self_attn.q_proj.weight",
             "layers.{layer}.self_attn.q_proj.kernel", TRANSPOSE)   # HF (out, in) -> ours (in, out)

Mixture-of-experts weights keep one stacked leaf per projection, `[experts, ...]`, where HF
checkpoints write one tensor per expert (`...experts.{expert}.gate_proj.weight`, as
save_pretrained writes them) or fused ones (transformers 5 in memory: `...experts.gate_up_proj`
`[experts, 2 * inter, hidden]`). `StackRule` and `SplitRule` bring both forms to one canonical
tensor per leaf (`assemble`) before the name rules apply: per-expert tensors are stacked once
all of them have come (a missing, doubled or out-of-range expert raises, naming the tensor),
fused ones are split in halves.

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
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import numpy as np

NONE = "none"  # the same layout on both sides
TRANSPOSE = "transpose"  # HF (..., out, in) <-> engine (..., in, out): the last two axes swap
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
class StackRule:
    """One tensor per expert (`hf`, with `{layer}` and `{expert}`), stacked along a new first
    axis into the canonical tensor `into` (with `{layer}`), which a NameRule maps."""

    hf: str
    into: str


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """A fused tensor (`hf`, with `{layer}`) cut into equal parts along `axis`, in the order of
    `into` (canonical names with `{layer}`)."""

    hf: str
    into: tuple[str, ...]
    axis: int


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
    stacks: tuple[StackRule, ...] = ()  # per-expert tensors -> one stacked tensor (MoE)
    splits: tuple[SplitRule, ...] = ()  # fused tensors -> their parts (MoE gate_up_proj)

    def stack_of(self, hf_name: str) -> tuple[str, int] | None:
        """A per-expert tensor's (canonical stacked name, expert index), or None."""
        for rule, pattern in zip(self.stacks, self._stack_patterns):
            if m := pattern.fullmatch(hf_name):
                return rule.into.replace("{layer}", m.group("layer")), int(m.group("expert"))
        return None

    def split_of(self, hf_name: str) -> tuple[tuple[str, ...], int] | None:
        """A fused tensor's (canonical names of its parts, axis), or None."""
        for rule, pattern in zip(self.splits, self._split_patterns):
            if m := pattern.fullmatch(hf_name):
                return tuple(n.replace("{layer}", m.group("layer")) for n in rule.into), rule.axis
        return None

    def expert_names(self, canonical: str) -> list[str]:
        """The per-expert HF name pattern(s) stacked into `canonical` (for error messages)."""
        out = []
        for rule, pattern in zip(self.stacks, self._into_patterns):
            if m := pattern.fullmatch(canonical):
                out.append(rule.hf.replace("{layer}", m.group("layer")))
        return out

    @functools.cached_property
    def _stack_patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_compile(r.hf) for r in self.stacks)

    @functools.cached_property
    def _into_patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_compile(r.into) for r in self.stacks)

    @functools.cached_property
    def _split_patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_compile(r.hf) for r in self.splits)

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
    escaped = re.escape(pattern).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    return re.compile(escaped.replace(re.escape("{expert}"), r"(?P<expert>\d+)"))


def to_engine_layout(array: Any, transform: str) -> Any:
    """An HF-layout tensor in the engine's layout (a view, no copy)."""
    if transform != TRANSPOSE:
        return array
    return array.T if len(array.shape) == 2 else array.swapaxes(-1, -2)


def engine_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """The shape `to_engine_layout` gives a tensor of `shape` (its own inverse)."""
    return (*shape[:-2], shape[-1], shape[-2]) if transform == TRANSPOSE and len(shape) >= 2 else shape


@dataclasses.dataclass(frozen=True)
class ShapeOnly:
    """A tensor's shape and dtype without its values (safetensors headers), for `assemble`."""

    shape: tuple[int, ...]
    dtype: str

    def __getitem__(self, index: tuple[slice, ...]) -> ShapeOnly:
        shape = list(self.shape)
        for axis, piece in enumerate(index):
            shape[axis] = len(range(*piece.indices(shape[axis])))
        return ShapeOnly(tuple(shape), self.dtype)


def _stack(parts: list[Any]) -> Any:
    if isinstance(parts[0], ShapeOnly):
        return ShapeOnly((len(parts), *parts[0].shape), parts[0].dtype)
    return np.stack([np.asarray(p) for p in parts])


def assemble(
    tensors: Iterator[tuple[str, Any]], names: HFNames, experts: Callable[[str], int | None]
) -> Iterator[tuple[str, Any]]:
    """HF tensors -> the same tensors with per-expert and fused ones in canonical form.

    `experts(canonical_name)`: how many experts the model stacks under that name (None: the
    model has no such tensor; its parts then pass through unchanged, for the caller to refuse
    by name). Per-expert tensors are held until their stack is complete; raises HFNameError for
    an expert index out of range, an expert sent twice, a stack left incomplete (naming the
    missing tensors), or a fused tensor that does not split evenly.

    >>> table = HFNames((), stacks=(StackRule("e.{layer}.{expert}.w", "e.{layer}.w"),))
    >>> [(n, a.shape) for n, a in assemble(iter([("e.0.1.w", np.ones(2)), ("e.0.0.w", np.ones(2))]),
    ...                                     table, lambda name: 2)]
    [('e.0.w', (2, 2))]
    """
    held: dict[str, dict[int, Any]] = {}
    source: dict[str, dict[int, str]] = {}
    for name, array in tensors:
        if split := names.split_of(name):
            parts, axis = split
            size = array.shape[axis]
            if size % len(parts):
                raise HFNameError(
                    f"tensor {name!r} {tuple(array.shape)}: axis {axis} ({size}) must split evenly into "
                    f"{len(parts)} parts {list(parts)}"
                )
            width = size // len(parts)
            for i, part in enumerate(parts):
                yield part, array[(slice(None),) * axis + (slice(i * width, (i + 1) * width),)]
            continue
        stack = names.stack_of(name)
        count = experts(stack[0]) if stack else None
        if stack is None or count is None:
            yield name, array
            continue
        into, expert = stack
        if expert >= count:
            raise HFNameError(
                f"tensor {name!r} is expert {expert}, but the model has {count} experts "
                f"(num_experts in config.json); send experts 0 to {count - 1}"
            )
        group = held.setdefault(into, {})
        if expert in group:
            raise HFNameError(f"tensor {name!r} is sent twice (also as {source[into][expert]!r}); send it once")
        group[expert] = array
        source.setdefault(into, {})[expert] = name
        if len(group) == count:
            yield into, _stack([group[e] for e in range(count)])
            del held[into], source[into]
    if held:
        into, group = next(iter(held.items()))
        count = experts(into) or 0
        missing = [e for e in range(count) if e not in group]
        pattern = names.expert_names(into)[0] if names.expert_names(into) else into
        shown = [pattern.replace("{expert}", str(e)) for e in missing[:4]]
        raise HFNameError(
            f"{len(missing)} expert tensor(s) missing for {into!r}: no {shown}"
            f"{' ...' if len(missing) > 4 else ''} ({len(group)} of {count} experts sent)"
            + (f"; {len(held) - 1} more stack(s) incomplete" if len(held) > 1 else "")
        )


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


def stack_sizes(names: HFNames, leaves: Mapping[str, Any]) -> Callable[[str], int | None]:
    """For `assemble`: the expert count of a canonical stacked name in a model whose leaves
    (`{path: anything with .shape}`) are given: the first dimension of the leaf it maps to."""

    def count(canonical: str) -> int | None:
        target = names.to_path(canonical)
        leaf = leaves.get(target[0]) if target else None
        return int(leaf.shape[0]) if leaf is not None and hasattr(leaf, "shape") else None

    return count


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
    if names.stacks or names.splits:
        leaves = paths if isinstance(paths, Mapping) else {}
        flat = dict(assemble(iter(flat.items()), names, stack_sizes(names, leaves)))
    for name, array in flat.items():
        kind, path, transform = names.classify(name, paths)
        if kind == "tied":  # without the embedding, the spec check reports it missing
            if names.tied_to is not None and names.tied_to in flat and not same_values(array, flat[names.tied_to]):
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
    if names.stacks or names.splits:
        tensors = assemble(tensors, names, stack_sizes(names, paths if isinstance(paths, Mapping) else {}))
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
