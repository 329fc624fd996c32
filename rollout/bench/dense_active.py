"""`rollout bench engine --moe`'s second reference: a dense Qwen3 with the MoE model's ACTIVE
parameters, measured in the same run.

A token of a Qwen3-MoE model goes through top_k experts of width moe_intermediate_size in each
sparse layer: the same multiply-adds as a dense SwiGLU MLP of width top_k x moe_intermediate_size.
The dense twin keeps everything else (hidden size, attention heads, head_dim, layers, vocab, tied
embeddings), so its parameters are the MoE model's active ones (router aside), and its decode
speed is what MoE decode should approach: at batch 1 on a CPU decode reads weights, so the MoE
model also pays for reading its experts (each token's k, and at larger batches up to all of
them), plus the routing and the gather/scatter of the grouped matmul.

Both run on the rollout engine (1 device, the same EngineConfig), timed alternately like the
transformers comparison (`interleaved_best`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Config keys of the MoE shape the dense twin drops (it has no experts).
_MOE_ONLY = ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob",
             "decoder_sparse_step", "mlp_only_layers")


def dense_active_shape(moe_shape: dict[str, Any]) -> dict[str, Any]:
    """The dense Qwen3 config overrides with the active parameters of a (fully sparse) MoE shape.

    >>> dense_active_shape(dict(hidden_size=8, intermediate_size=99, moe_intermediate_size=3,
    ...                         num_experts=16, num_experts_per_tok=4, num_hidden_layers=2))
    {'hidden_size': 8, 'intermediate_size': 12, 'num_hidden_layers': 2}
    """
    shape = {k: v for k, v in moe_shape.items() if k not in _MOE_ONLY}
    shape["intermediate_size"] = moe_shape["num_experts_per_tok"] * moe_shape["moe_intermediate_size"]
    return shape


@dataclasses.dataclass
class DenseActiveReference:
    """The dense twin's engine; `measure` times it against the MoE engine at one batch size."""

    engine: Any
    params: int  # its parameter count
    run: Callable[[int], list[list[int]]]

    @classmethod
    def start(cls, directory: Path, moe_shape: dict[str, Any], engine_config: Any, prompts: list[list[int]],
              sampling: Any) -> DenseActiveReference:
        import jax
        import numpy as np

        from rollout.engine.native.engine import Engine
        from rollout.testing import make_tiny_checkpoint

        shape = dense_active_shape(moe_shape)
        ckpt = make_tiny_checkpoint(directory, "Qwen3ForCausalLM", **shape)
        engine = Engine(ckpt, engine_config, devices=jax.devices()[:1])
        params = sum(int(np.prod(leaf.shape)) for leaf in engine.spec.leaves)

        def run(batch: int) -> list[list[int]]:
            return [list(c.token_ids) for c in engine.generate(prompts[:batch], sampling)]

        return cls(engine, params, run)

    def measure(self, batch: int, run_moe: Callable[[], Any], repeats: int,
                interleaved_best: Callable[..., tuple[float, float]], new_tokens: int) -> dict[str, float]:
        """Row fields: the dense twin's tok/s and the MoE model's tok/s over it, timed alternately."""
        self.run(batch)  # warm-up: compiles this batch's shapes
        t_moe, t_dense = interleaved_best(run_moe, lambda: self.run(batch), repeats)
        n = batch * new_tokens
        return {"moe_tok_s_vs_dense": n / t_moe, "dense_active_tok_s": n / t_dense, "moe_over_dense_active": t_dense / t_moe}

    def lines(self, rows: list[dict[str, Any]], moe_params: int, active: int) -> list[str]:
        out = [
            f"\nMoE against a dense Qwen3 with the same active parameters ({self.params / 1e6:.1f}M: "
            f"intermediate = top_k x moe_intermediate; the MoE model: {moe_params / 1e6:.1f}M, "
            f"{active / 1e6:.1f}M active per token), both on the rollout engine, timed alternately",
            f"{'batch':>5} {'MoE tok/s':>10} {'dense-active tok/s':>19} {'MoE/dense-active':>17}",
        ]
        out += [
            f"{r['batch']:>5} {r['moe_tok_s_vs_dense']:>10.1f} {r['dense_active_tok_s']:>19.1f} "
            f"{r['moe_over_dense_active']:>16.2f}x"
            for r in rows if "dense_active_tok_s" in r
        ]
        return out

    def shutdown(self) -> None:
        self.engine.shutdown()


def active_params(model_config: Any, params: int) -> int:
    """Parameters a token uses: all but the experts it is not routed to (num_experts - top_k of
    each sparse layer's). The router counts as active."""
    c = model_config
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    return params - len(c.moe_layers) * (c.num_experts - c.num_experts_per_tok) * per_expert
