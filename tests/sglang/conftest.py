"""Fixtures of the sglang-jax backend tests (marked `sglang`).

They run inside the Python 3.13 root that `.ci/sglang_root.sh` builds (sglang-jax 0.0.2 needs
Python >= 3.12); where the backend cannot run (Python < 3.12 or no sglang-jax, as on the host
of the README's test command) they are not collected at all, and tests/test_sglang_host.py
covers the host side. Their transformers references are made on the host by
tests/sglang/make_references.py into $ROLLOUT_SGLANG_REFS (`.ci/run` does both steps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from rollout.engine.sglang.requirements import runs_here

if not runs_here():  # the README's host run; `.ci/run` runs them in the root after it
    collect_ignore_glob = ["test_*.py"]

REFS_HINT = (
    "make them on the host with `python tests/sglang/make_references.py DIR` (host venv of .[test]), then run "
    "the tests with ROLLOUT_SGLANG_REFS=DIR .ci/sglang_root.sh run python -m pytest -q -m sglang tests/sglang"
)


@pytest.fixture(scope="session")
def refs() -> dict[str, Any]:
    """The host-made references: {'dir', 'prompts', 'max_new_tokens', 'greedy': {'a': ..., 'b': ...}}."""
    directory = Path(os.environ.get("ROLLOUT_SGLANG_REFS", "/refs"))
    file = directory / "refs.json"
    if not file.is_file():
        pytest.fail(f"no transformers references at {file}; {REFS_HINT}")
    data = json.loads(file.read_text())
    data["dir"] = directory
    return data


@pytest.fixture(scope="session")
def ckpt_a(refs: dict[str, Any]) -> Path:
    return refs["dir"] / "a"


@pytest.fixture(scope="session")
def ckpt_b(refs: dict[str, Any]) -> Path:
    return refs["dir"] / "b"
