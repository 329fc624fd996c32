"""The sglang-jax model's own parameter state, mapped to rollout's paths through HF names.

sglang-jax 0.0.2 keeps the model's state leaves and their treedef only as closure variables of
`ModelRunner.jitted_run_model` (later upstream versions expose `model_state_leaves`). `ModelState`
takes them from there once, at start, and installs its own `jitted_run_model` on that runner
instance: the same jitted function, called with `self.leaves`. A swap is then one assignment of
a new leaf list, made by the scheduler thread between two steps; the compiled programs are
reused because every new leaf has the serving leaf's shape, dtype and sharding. `ModelState` is
the swap target of the backend's weight state (rollout.engine.weight_state.SwapTarget, with a
leaf list as the parameters and nothing derived).

The common currency between the two engines is the HF tensor name: sglang-jax's model says which
HF name fills each of its leaves (its weight mappings, with a transpose flag), and
the family's name table (`spec.hf`, rollout.weights.hf_names) says which rollout path (and layout)
each HF name is. The backend's
`spec` is therefore the native engine's spec for the same checkpoint, and an update that fits one
fits the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from rollout.engine.placement import place
from rollout.engine.staging import check_host_leaf
from rollout.weights.hf_names import TRANSPOSE
from rollout.weights.spec import ParamSpec, flatten_params


class StateMappingError(RuntimeError):
    """sglang-jax's model state does not map one to one onto the checkpoint's parameters."""


@dataclasses.dataclass(frozen=True)
class LeafMap:
    path: str  # rollout engine path, e.g. layers.0.self_attn.q_proj.kernel
    hf_name: str  # e.g. model.layers.0.self_attn.q_proj.weight
    index: int  # position among sglang-jax's state leaves
    sgl_path: str  # e.g. transformer.layers.0.self_attn.q_proj.weight
    transpose: bool  # sglang-jax's leaf is the transpose of rollout's layout


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _dotted(key_path: tuple[Any, ...]) -> str:
    parts = [_key_name(e) for e in key_path]
    while parts and parts[-1] in ("value", "raw_value"):  # a Variable's own field, if flattened
        parts.pop()
    return ".".join(parts)


def _weight_mappings(model: Any) -> dict[str, Any]:
    """HF name -> sglang-jax WeightMapping, from the model's own table."""
    makers = [n for n in dir(type(model)) if n.startswith("_create_") and n.endswith("_weight_mappings")]
    if len(makers) != 1:
        raise StateMappingError(
            f"expected one _create_*_weight_mappings method on {type(model).__name__} (sglang-jax 0.0.2's "
            f"models have one), found {makers}"
        )
    return dict(getattr(model, makers[0])())


class ModelState:
    """The serving leaves of one sglang-jax ModelRunner, and the mapping to rollout paths."""

    def __init__(self, model_runner: Any, spec: ParamSpec):
        wrapper = model_runner.jitted_run_model
        cells = {
            name: cell.cell_contents for name, cell in zip(wrapper.__code__.co_freevars, wrapper.__closure__ or ())
        }
        missing = {"jitted_run_model", "model_def", "model_state_def", "model_state_leaves"} - set(cells)
        if missing:
            raise StateMappingError(
                f"sglang-jax's ModelRunner.jitted_run_model does not close over {sorted(missing)}; this "
                "backend supports the layout of sglang-jax 0.0.2"
            )
        self._jitted = cells["jitted_run_model"]
        self._model_def = cells["model_def"]
        self._treedef = cells["model_state_def"]
        self.leaves: list[jax.Array] = list(cells["model_state_leaves"])
        self.spec = spec
        runner = model_runner

        def jitted_run_model(forward_batch: Any, logits_metadata: Any) -> Any:
            return self._jitted(
                self._model_def, self._treedef, self.leaves, forward_batch, runner.token_to_kv_pool, logits_metadata
            )

        runner.jitted_run_model = jitted_run_model
        self.table = self._map(model_runner.model)

    def _map(self, model: Any) -> tuple[LeafMap, ...]:
        state = jax.tree_util.tree_unflatten(self._treedef, self.leaves)
        flat, _ = jax.tree_util.tree_flatten_with_path(state)
        index = {_dotted(kp): i for i, (kp, _) in enumerate(flat)}
        if len(index) != len(self.leaves):
            raise StateMappingError(f"{len(self.leaves)} state leaves but {len(index)} distinct paths")
        want = self.spec.by_path()
        names = self.spec.hf  # the model family's HF name table
        table: list[LeafMap] = []
        for hf_name, mapping in _weight_mappings(model).items():
            target = names.to_path(hf_name) if names is not None else None
            if target is None:
                raise StateMappingError(f"sglang-jax loads HF tensor {hf_name!r}, which rollout's name table does not know")
            path, ours_transposed = target[0], target[1] == TRANSPOSE
            if path not in want:
                raise StateMappingError(f"sglang-jax loads {hf_name!r} -> {path!r}, which the checkpoint's spec lacks")
            if mapping.target_path not in index:
                raise StateMappingError(
                    f"sglang-jax maps {hf_name!r} to {mapping.target_path!r}, which its model state does not "
                    f"have (state paths: {sorted(index)[:6]} ...)"
                )
            i = index[mapping.target_path]
            transpose = bool(ours_transposed) != bool(mapping.transpose)
            shape = want[path].shape[::-1] if transpose else want[path].shape
            got = tuple(self.leaves[i].shape)
            if got != shape:
                raise StateMappingError(
                    f"sglang-jax holds {hf_name!r} as {mapping.target_path!r} with shape {got}, expected {shape} "
                    "from the checkpoint (sglang-jax pads head_dim below 128 and replicates KV heads when "
                    "devices outnumber them: use fewer devices than KV heads, or engine='native')"
                )
            table.append(LeafMap(path, hf_name, i, mapping.target_path, transpose))
        covered = {m.path for m in table}
        if covered != set(want):
            raise StateMappingError(f"sglang-jax's mappings leave rollout paths unset: {sorted(set(want) - covered)[:8]}")
        mapped = {m.index for m in table}
        # What is not a parameter: the RNG state `load_weights` attaches (key and count leaves).
        others = [p for p, i in index.items() if i not in mapped and "rng" not in p.split(".")[0]]
        if others:
            raise StateMappingError(f"sglang-jax state leaves that no HF tensor fills: {others[:8]}")
        return tuple(sorted(table, key=lambda m: list(want).index(m.path)))

    def current(self) -> dict[str, jax.Array]:
        """rollout path -> serving leaf (in sglang-jax's layout: see LeafMap.transpose)."""
        leaves = self.leaves
        return {m.path: leaves[m.index] for m in self.table}

    def shapes(self) -> list[tuple[tuple[int, ...], str, Any]]:
        return [(tuple(a.shape), str(a.dtype), a.sharding) for a in self.leaves]

    def prepare(self, params: Any, *, finite_checked: bool = False) -> list[jax.Array]:
        """A full new leaf list from an update in any accepted form (rollout paths or HF names).

        Raises SpecMismatchError (the native engine's wording) or NonFiniteWeightsError before
        anything is placed; each leaf lands on its serving leaf's sharding, in fresh memory.
        """
        flat = flatten_params(params, self.spec)
        self.spec.check(ParamSpec.of(flat))
        dtypes = self.spec.by_path()
        serving = self.leaves
        new = list(serving)  # non-parameter leaves (RNG state) carry over
        for m in self.table:
            host = check_host_leaf(m.path, flat[m.path], dtypes[m.path].dtype, check_finite=not finite_checked)
            new[m.index] = place(host.T if m.transpose else host, serving[m.index].sharding)
        jax.block_until_ready(new)
        return new

    # -- the weight state's swap target (rollout.engine.weight_state.SwapTarget) ----------------

    @property
    def params(self) -> list[jax.Array]:
        """The serving leaves (sglang-jax's order and layout)."""
        return self.leaves

    @property
    def derived(self) -> dict[str, jax.Array]:
        return {}  # sglang-jax's model derives nothing beside its leaves

    def derive(self, params: list[jax.Array]) -> dict[str, jax.Array]:
        return {}

    def set_params(self, params: list[jax.Array], derived: dict[str, jax.Array] | None = None) -> None:
        """Serve `params` (a leaf list from `prepare`) from the next step on (only between steps)."""
        self.leaves = params

