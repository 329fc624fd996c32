"""Helpers of the sglang-jax tests: greedy sampling, syncs in each accepted form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rollout.engine import SamplingParams

TIMEOUT = 120


def greedy(max_tokens: int) -> SamplingParams:
    """Greedy, EOS ignored: exactly max_tokens new tokens (as the transformers references)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def tokens(engine: Any, prompts: list[Any], max_tokens: int) -> list[list[int]]:
    outs = engine.generate(prompts, greedy(max_tokens), return_logprobs=False, timeout=TIMEOUT)
    return [list(c.token_ids) for c in outs]


def hf_flat(path: Path) -> dict[str, np.ndarray]:
    """A flat dict of HF tensor names, as a trainer exporting HF names would send."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def trainer_pytree(path: Path) -> dict[str, Any]:
    """A nested dict of jax arrays in rollout's engine layout, as a JAX trainer holds them."""
    import jax.numpy as jnp

    from rollout.models.bind import ModelDef
    from rollout.models.config import ModelConfig
    from rollout.weights.spec import flatten_params

    spec = ModelDef.create(ModelConfig.from_pretrained(path), "float32").spec  # its HF name table
    tree: dict[str, Any] = {}
    for dotted, array in flatten_params(hf_flat(path), spec).items():
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(np.ascontiguousarray(array))
    return tree


def sync(engine: Any, update: Any) -> int:
    """Stage `update` (an HF directory, or any accepted tree) as the next version; commit; wait."""
    version = engine.version + 1
    if isinstance(update, (str, Path)):
        engine.stage_checkpoint(version, update)
    else:
        engine.stage(version, update)
    engine.commit(version, wait=True, timeout=TIMEOUT)
    return version
