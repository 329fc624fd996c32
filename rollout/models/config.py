"""Model configuration: one frozen dataclass for the Qwen decoder families, read from an HF config.json.

Only what this code implements is accepted. A checkpoint asking for something else (sliding-window
attention, an unsupported rope_scaling, an unknown architecture) is refused with an error naming
the field and its value, rather than silently producing wrong logits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rollout.errors import UnsupportedConfigError
from rollout.models.registry import family_for

__all__ = ["ModelConfig", "UnsupportedConfigError"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Qwen-family decoder (Qwen3 dense, Qwen2/2.5, Qwen3-MoE).

    A mixture-of-experts model (`num_experts` > 0) replaces the MLP of the layers in
    `moe_layers` by `num_experts` experts of width `moe_intermediate_size`, of which each token
    uses `num_experts_per_tok`; the other layers keep a dense MLP of `intermediate_size`.
    """

    architecture: str  # HF `architectures[0]`, the registry key
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads: GQA; 1: MQA
    head_dim: int  # may differ from hidden_size // num_heads (Qwen3)
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    qk_norm: bool  # Qwen3: RMSNorm on each q/k head before RoPE
    qkv_bias: bool  # Qwen2: bias on q/k/v projections
    eos_token_ids: tuple[int, ...] = ()
    # mixture of experts (0 / () in a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # width of one expert's MLP
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    moe_layers: tuple[int, ...] = ()  # indices of the layers whose MLP is a sparse MoE block

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.moe_layers and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                f"num_experts={self.num_experts}"
            )

    @property
    def is_moe(self) -> bool:
        """Whether any layer routes tokens to experts."""
        return bool(self.moe_layers)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
        arch = _architecture(hf)
        family = family_for(arch)
        _refuse_unsupported(hf)
        if not family.moe and (hf.get("num_experts") or hf.get("num_local_experts")):
            raise UnsupportedConfigError(
                f"{arch} with num_experts set is not implemented; mixture-of-experts checkpoints "
                "are served as Qwen3MoeForCausalLM"
            )
        if hf.get("attention_bias") and not family.qkv_bias:
            raise UnsupportedConfigError(
                f"attention_bias={hf['attention_bias']!r} is not implemented for {arch}; expected false"
            )
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        eos = eos_token_ids or _as_tuple(hf.get("eos_token_id"))
        num_layers = int(hf["num_hidden_layers"])
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(_rope_parameters(hf)[1].get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            qk_norm=family.qk_norm,
            qkv_bias=family.qkv_bias,
            eos_token_ids=eos,
            **(_moe_fields(hf, num_layers) if family.moe else {}),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"expected an HF checkpoint directory with config.json, found none in {path}"
            )
        hf = json.loads(cfg_file.read_text())
        eos = _as_tuple(hf.get("eos_token_id"))
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen_eos = _as_tuple(json.loads(gen_file.read_text()).get("eos_token_id"))
            eos = tuple(dict.fromkeys(eos + gen_eos))
        return cls.from_hf(hf, eos_token_ids=eos)


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _architecture(hf: Mapping[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if not archs:
        raise UnsupportedConfigError(
            "config.json has no `architectures` entry; expected e.g. ['Qwen3ForCausalLM']"
        )
    return str(archs[0])


def _refuse_unsupported(hf: Mapping[str, Any]) -> None:
    if hf.get("use_sliding_window"):
        raise UnsupportedConfigError(
            f"use_sliding_window={hf['use_sliding_window']!r} (sliding_window={hf.get('sliding_window')!r}) "
            "is not implemented; only full attention is. Set use_sliding_window=false if the "
            "checkpoint was trained without it."
        )
    layer_types = hf.get("layer_types") or []
    other = sorted({str(t) for t in layer_types} - {"full_attention"})
    if other:
        raise UnsupportedConfigError(
            f"layer_types contains {other} (e.g. {other[0]!r}); only 'full_attention' layers "
            "are implemented"
        )
    field, rope = _rope_parameters(hf)
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in (None, "default"):
        raise UnsupportedConfigError(
            f"{field} type {kind!r} is not implemented; only default RoPE "
            f"({field}=null or rope_type 'default') is supported"
        )
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfigError(
            f"partial_rotary_factor={partial!r} is not implemented; only full rotary embeddings (1.0) are"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"hidden_act={act!r} is not implemented; expected 'silu'")


def _moe_fields(hf: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config, read as transformers reads them.

    Layer i is sparse when it is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step
    == 0 (transformers' Qwen3MoeDecoderLayer). transformers 5 writes `num_local_experts` for
    `num_experts`; both are read.
    """
    num_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    step = int(hf.get("decoder_sparse_step") or 1)
    dense_only = {int(i) for i in hf.get("mlp_only_layers") or ()}
    sparse = tuple(i for i in range(num_layers) if num_experts > 0 and i not in dense_only and (i + 1) % step == 0)
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=int(hf.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(hf.get("moe_intermediate_size") or 0),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layers=sparse,
    )


def _rope_parameters(hf: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(field name, RoPE settings) in either config layout, read the way transformers reads them.

    transformers 4 writes `rope_theta` and `rope_scaling` at the top level; transformers 5 writes
    `rope_parameters: {rope_type, rope_theta, ...}` and no top-level `rope_theta`. A legacy
    `rope_scaling` wins over `rope_parameters`, and a `rope_theta` inside the dict wins over the
    top-level one.
    """
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = dict(hf.get(field) or {})
    if "rope_theta" not in rope and "rope_theta" in hf:
        rope["rope_theta"] = hf["rope_theta"]
    return field, rope
