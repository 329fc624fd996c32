"""Workarounds for defects of the installed sglang-jax, each gated on the versions it is for.

Nothing here edits installed files: two are flax configuration flags, one wraps a function of
sglang-jax's sampler module in this process. `apply(version)` applies the ones for `version`
and returns their names; tests/sglang/test_workarounds.py shows for each what breaks without it.

0.0.2 (with the flax 0.12.x its pins resolve to):

1. `shard_variables_off`: flax >= 0.12.6 shards variables at creation by default, and
   sglang-jax's `LinearBase` then fails with "ValueError: An auto mesh context or metadata is
   required ... out_sharding=PartitionSpec(None, None)". Flag: flax_always_shard_variable=False.
2. `pytree_modules_off`: flax 0.12 registers every nnx.Module as a pytree; sglang-jax registers
   its `NativeAttention` again itself: "ValueError: Duplicate custom PyTreeDef type registration".
   Flag: flax_pytree_module=False, which flax reads when flax.nnx is imported; if that happened
   earlier, the default it froze is set too (before sgl_jax is imported).
3. `min_p_operands`: on a non-TPU runtime the sampler passes `(probs, min_ps, False)` to
   `_apply_min_p_filter`, which unpacks two values: "ValueError: too many values to unpack
   (expected 2)" while precompiling. The wrapper passes the first two on.

Handled by the adapter by design rather than here (it needs no version gate): 0.0.2's
detokenizer path repeats token ids in `output_ids` of a non-streamed request longer than 50
tokens (it resends ids whose text ended in an incomplete character), so the adapter takes each
finished request's ids from the scheduler's own `Req.output_ids` (see adapter._hook_scheduler;
tests/sglang/test_engine.py's long-completion test fails without it). And `return_logprob=True`
crashes the 0.0.2 scheduler on CPU: the adapter refuses such requests before queueing them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Workaround:
    name: str
    versions: tuple[str, ...]
    symptom: str
    apply: Callable[[], None]


def _flax_flag(name: str, value: bool) -> Callable[[], None]:
    def apply() -> None:
        # The environment for flax imported later (and Ray's subprocesses); the config for a flax
        # already imported in this process.
        os.environ[name.upper()] = "true" if value else "false"
        import flax

        if hasattr(flax.config, name):
            flax.config.update(name, value)

    return apply


def _pytree_modules_off() -> None:
    _flax_flag("flax_pytree_module", False)()
    # flax reads the flag once, as the default of `Pytree.__init_subclass__(pytree=...)` when
    # flax.nnx is imported; if something imported it before (rollout's own models, a trainer),
    # the flag alone is too late for the classes sgl_jax defines next, so set that default too.
    from flax.nnx import pytreelib

    init_subclass: Any = pytreelib.Pytree.__init_subclass__  # a bound classmethod: its function holds the defaults
    defaults = init_subclass.__func__.__kwdefaults__
    if defaults and defaults.get("pytree"):
        defaults["pytree"] = False


def _wrap_min_p_filter() -> None:
    from sgl_jax.srt.layers import sampler

    original = sampler._apply_min_p_filter
    if getattr(original, "_rollout_workaround", False):
        return

    def apply_min_p_filter(operands):
        return original(tuple(operands[:2]))

    apply_min_p_filter._rollout_workaround = True  # type: ignore[attr-defined]
    sampler._apply_min_p_filter = apply_min_p_filter


WORKAROUNDS = (
    Workaround(
        "shard_variables_off",
        ("0.0.2",),
        "ValueError: An auto mesh context or metadata is required (LinearBase, out_sharding)",
        _flax_flag("flax_always_shard_variable", False),
    ),
    Workaround(
        "pytree_modules_off",
        ("0.0.2",),
        "ValueError: Duplicate custom PyTreeDef type registration for NativeAttention",
        _pytree_modules_off,
    ),
    Workaround(
        "min_p_operands",
        ("0.0.2",),
        "ValueError: too many values to unpack (expected 2) in sampler._apply_min_p_filter",
        _wrap_min_p_filter,
    ),
)


def for_version(version: str) -> tuple[Workaround, ...]:
    return tuple(w for w in WORKAROUNDS if version in w.versions)


def apply(version: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Apply every workaround for `version` (in order: the flags before sgl_jax is imported),
    except those named in `skip` (tests use it to show what each one prevents)."""
    applied = []
    for workaround in for_version(version):
        if workaround.name in skip:
            continue
        workaround.apply()
        applied.append(workaround.name)
    return applied
