"""No import loops inside `rollout/` or `trainer_stub/`.

Every import statement counts, wherever it is: at the top of a module, inside a function (a loop
that only closes at run time), under `if TYPE_CHECKING:`. A loop is broken by moving the piece both
modules need to where it belongs, not by hiding one of the imports inside a function, so the
checker reads all of them. `import a.b.c` counts as importing `a.b.c` only (not its parent
packages, which Python imports on the way); `from a.b import c` counts as importing `a.b.c` when
that is a module, else `a.b`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rollout", "trainer_stub")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """{dotted module name: file} of every module of `packages` under `root`."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _known(name: str, modules: set[str]) -> str | None:
    """The module `name` is, or the nearest package above it that is one of `modules`."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` that module `name` (at `path`) imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else _known(base, modules))
    return {m for m in found if m is not None and m != name}


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def two_module_cycles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of modules that import each other, each pair once."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if a < b and a in graph.get(b, ()))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops of any length: strongly connected groups of more than one module."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []
    for start in sorted(graph):
        if start in order:
            continue
        # iterative Tarjan: (module, its targets not yet visited)
        work = [(start, iter(sorted(graph[start])))]
        order[start] = low[start] = len(order)
        stack.append(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in order:
                    order[target] = low[target] = len(order)
                    stack.append(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    break
                if target in stack:
                    low[node] = min(low[node], order[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == order[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_sees_loops_through_function_level_and_type_checking_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/engine.py": "def score():\n    from pkg.scoring import run\n    return run()\n",
        "pkg/scoring.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.engine import score\n",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "from . import c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/leaf.py": "import pkg.engine\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert two_module_cycles(graph) == [("pkg.engine", "pkg.scoring")]
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.engine", "pkg.scoring"]]


def test_no_two_modules_import_each_other():
    graph = import_graph(ROOT)
    assert "rollout.coordinator.service" in graph and "trainer_stub.train" in graph  # the right tree
    loops = two_module_cycles(graph)
    assert not loops, (
        f"modules that import each other (counting imports inside functions and under TYPE_CHECKING): {loops}; "
        "move what both need into a module of its own (or into the lower of the two) instead"
    )


def test_no_import_loop_of_any_length():
    loops = cycles(import_graph(ROOT))
    assert not loops, (
        f"import loops (each a group of modules that reach each other): {loops}; move what they share "
        "into a module that none of them is imported by"
    )
