"""The folders state who runs what, and imports point one way.

- `rollout/worker/` (inside each Ray actor) imports nothing of `rollout/coordinator/` (the
  driver): what both sides read lives beside them (`rollout.protocol`, `rollout.relay`,
  `rollout.fleet_config`, the engine's vocabulary, `rollout.weights`).
- The lower floors (`rollout/engine/`, `rollout/models/`, `rollout/weights/`) import neither side
  nor the HTTP server.
- KV layouts are plug-ins of the native engine: nothing under `engine/native/kv/` imports the
  engine facade (`engine/native/engine.py`) back.
"""

from __future__ import annotations

from tests.test_import_cycles import ROOT, import_graph

GRAPH = import_graph(ROOT, ("rollout",))


def offending(importers: str, imported: tuple[str, ...]) -> dict[str, list[str]]:
    """{module under `importers`: the modules under `imported` it imports}."""
    found = {}
    for name, deps in GRAPH.items():
        if name == importers or name.startswith(importers + "."):
            bad = sorted(d for d in deps if any(d == p or d.startswith(p + ".") for p in imported))
            if bad:
                found[name] = bad
    return found


def test_the_worker_imports_nothing_of_the_coordinator():
    assert offending("rollout.worker", ("rollout.coordinator",)) == {}


def test_engine_models_and_weights_import_neither_side_nor_the_server():
    upper = ("rollout.coordinator", "rollout.worker", "rollout.server", "rollout.bench")
    for floor in ("rollout.engine", "rollout.models", "rollout.weights"):
        assert offending(floor, upper) == {}, floor


def test_kv_layouts_do_not_import_the_engine_facade_back():
    assert offending("rollout.engine.native.kv", ("rollout.engine.native.engine",)) == {}


def test_the_checker_sees_a_forbidden_import():
    assert offending("rollout.coordinator.service", ("rollout.worker",))  # the service starts actors
