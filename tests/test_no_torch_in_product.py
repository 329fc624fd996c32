"""The product never imports PyTorch or transformers (they are test-only numerical references),
and `import rollout` stays light: no jax until an engine or model is used.

Each check runs in a fresh interpreter, since this test process has long imported both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

FORBIDDEN = ("torch", "transformers", "peft")


def run_fresh(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object as its last line."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)  # one device is enough; start-up stays short
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_every_rollout_module_imports_neither_torch_nor_transformers():
    result = run_fresh(
        """
        import importlib, json, pkgutil, sys, traceback
        import rollout

        modules, failed = [], {}
        for info in pkgutil.walk_packages(rollout.__path__, "rollout."):
            try:
                importlib.import_module(info.name)
                modules.append(info.name)
            except Exception:
                failed[info.name] = traceback.format_exc(limit=3)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print(json.dumps({"modules": modules, "failed": failed, "loaded": loaded}))
        """
    )
    assert not result["failed"], "rollout modules failed to import:\n" + "\n".join(result["failed"].values())
    # the walk really covered the package
    for module in ("rollout.models.qwen", "rollout.weights.loader", "rollout.engine.native.engine", "rollout.models.sharding"):
        assert module in result["modules"]
    assert result["loaded"] == [], f"product code imported {result['loaded'][:10]}"


def test_import_rollout_does_not_import_jax():
    result = run_fresh(
        """
        import json, sys
        import rollout
        print(json.dumps({"jax": sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax"))}))
        """
    )
    assert result["jax"] == [], f"`import rollout` imported {result['jax'][:10]}"
