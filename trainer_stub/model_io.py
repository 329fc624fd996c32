"""Trainer parameters: read from an HF checkpoint through rollout's loader, or freshly initialized.

Both give the flat `{dotted path: array}` dict that `ModelDef.bind` turns into the NNX model and
that `rollout.sync_weights` accepts as is, so the trainer and the rollout fleet agree on names,
layouts and shapes by construction. The arrays live on this process's default device: the
trainer is a plain single-device JAX program here.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rollout.models.bind import ModelDef
from rollout.models.config import ModelConfig
from rollout.weights.loader import load_checkpoint, resolve_checkpoint

Params = dict[str, jax.Array]


def model_def_for(model: str | os.PathLike[str], dtype: str = "float32") -> tuple[ModelDef, Path]:
    """The ModelDef of a checkpoint (local HF directory or repo id) and its local directory."""
    directory = resolve_checkpoint(model)
    return ModelDef.create(ModelConfig.from_pretrained(directory), dtype), directory


def load_params(model: str | os.PathLike[str], dtype: str = "float32") -> tuple[ModelDef, Params]:
    """Parameters of an HF checkpoint on the local default device, cast to `dtype`.

    The loader reads one tensor at a time and checks every name and shape against the model
    that config.json describes (see rollout.weights.loader.load_checkpoint).
    """
    model_def, directory = model_def_for(model, dtype)
    device = jax.local_devices()[0]
    np_dtype = jnp.dtype(model_def.dtype)

    def place(path: str, array: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(array).astype(np_dtype, copy=False), device)

    params = load_checkpoint(directory, model_def.spec, place)
    return model_def, params  # type: ignore[return-value]


def init_params(model: str | os.PathLike[str], seed: int = 0, dtype: str = "float32") -> tuple[ModelDef, Params]:
    """Fresh random parameters (N(0, 0.02), norms at 1) for the model a checkpoint's config describes."""
    model_def, _ = model_def_for(model, dtype)
    device = jax.local_devices()[0]
    return model_def, {p: jax.device_put(a, device) for p, a in model_def.init_params(seed).items()}
