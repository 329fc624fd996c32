"""`python -m rollout.bench NAME [options]`: the same as `rollout bench NAME [options]`.

For a machine where the package is a copy of the repository rather than an installed
distribution (no `rollout` script): `PYTHONPATH=. python -m rollout.bench engine --platform gpu`.
Only the benchmark's own module is imported, so the engine benchmark runs without Ray.
"""

from __future__ import annotations

import importlib
import sys

from rollout.bench import BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        got = repr(argv[0]) if argv else "nothing"
        print(f"usage: python -m rollout.bench NAME [options]; NAME is one of {names}, got {got}. "
              "`python -m rollout.bench NAME --help` shows a benchmark's options.", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return int(importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
