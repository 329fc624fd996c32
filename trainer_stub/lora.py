"""LoRA training for the demo (`rollout demo --lora R`): the base stays frozen, the trainer
updates rank-R factors on every linear layer, and each sync sends only the adapter.

    lora = LoraTraining.create(model_def, base_params, rank=16)
    factors = lora.init(seed)                     # A ~ U(+-1/sqrt(in)), B = 0: starts at the base
    step = lora.train_step(optimizer, temperature)
    factors, opt_state, metrics = step(factors, opt_state, batch, lora.base)
    client.sync_weights(lora.adapter(factors))    # a rollout.LoraAdapter in PEFT names

The forward merges `W = W_base + scale * (B @ A)^T` in the engine layout (kernels (in, out)) the
way every rollout engine does (rollout.engine.native.lora), so the on-policy logprob check holds
as with full syncs; an adapter that never reached the rollout shows as a large difference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rollout.models.bind import ModelDef
from rollout.weights.lora import LoraAdapter, LoraConfig, linear_modules
from trainer_stub import grpo

Params = dict[str, jax.Array]
Factors = dict[str, dict[str, jax.Array]]  # kernel path -> {"A": (r, in), "B": (out, r)}


@dataclasses.dataclass(frozen=True)
class LoraTraining:
    model_def: ModelDef
    base: Params  # frozen
    config: LoraConfig
    modules: dict[str, str]  # HF module name -> kernel path (every linear layer)

    @classmethod
    def create(cls, model_def: ModelDef, base: Params, rank: int, alpha: float | None = None) -> LoraTraining:
        config = LoraConfig(rank=rank, alpha=float(alpha if alpha is not None else 2 * rank))
        return cls(model_def, base, config, linear_modules(model_def.spec))

    def init(self, seed: int) -> Factors:
        """PEFT's default init: A uniform in +-1/sqrt(in), B zeros (the adapter starts as the base)."""
        rng = np.random.default_rng(seed)
        shapes = self.model_def.spec.by_path()
        out: Factors = {}
        for path in self.modules.values():
            d_in, d_out = shapes[path].shape
            bound = 1.0 / np.sqrt(d_in)
            a = rng.uniform(-bound, bound, (self.config.rank, d_in)).astype(np.float32)
            out[path] = {"A": jnp.asarray(a), "B": jnp.zeros((d_out, self.config.rank), jnp.float32)}
        return out

    def merged(self, factors: Factors) -> Params:
        return merge(self.base, factors, self.config.scale)

    def adapter(self, factors: Factors) -> LoraAdapter:
        """The factors as a PEFT-named adapter (host arrays): what a sync sends."""
        host = jax.device_get(factors)
        tensors = {}
        for module, path in self.modules.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.asarray(host[path]["A"])
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.asarray(host[path]["B"])
        return LoraAdapter(tensors, self.config)

    def nbytes(self, factors: Factors) -> int:
        return sum(int(f["A"].nbytes) + int(f["B"].nbytes) for f in factors.values())

    def train_step(self, optimizer: optax.GradientTransformation, temperature: float) -> Any:
        """A jitted `step(factors, opt_state, batch, base) -> (factors, opt_state, metrics)`;
        metrics["logprobs"] are under the adapter passed in (the one synced last)."""
        return _train_step(self.model_def, optimizer, temperature, self.config.scale)


def merge(base: Params, factors: Factors, scale: float) -> Params:
    out = dict(base)
    for path, f in factors.items():
        out[path] = base[path] + scale * (f["A"].T @ f["B"].T)  # (in, r) @ (r, out)
    return out


def _train_step(model_def: ModelDef, optimizer: optax.GradientTransformation, temperature: float, scale: float) -> Any:
    def step(factors: Factors, opt_state: Any, batch: dict[str, jax.Array], base: Params):
        (loss, logp), grads = jax.value_and_grad(
            lambda f: grpo.pg_loss(model_def, merge(base, f, scale), batch, temperature), has_aux=True
        )(factors)
        updates, opt_state = optimizer.update(grads, opt_state, factors)
        factors = optax.apply_updates(factors, updates)
        return factors, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "logprobs": logp}

    return jax.jit(step)
