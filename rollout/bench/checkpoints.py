"""The benchmarks' random checkpoints: their shapes, parameter counts, and how they are written.

`SHAPES` names each Qwen3-shaped checkpoint the engine benchmark can make (`--shape`), as
overrides of rollout.testing.BENCH_QWEN3. The small ones run on a CPU; `qwen3-0.6b` and
`qwen3-8b` have the real models' shapes (random weights) for an accelerator.

`make_checkpoint(directory, shape, dtype)` writes one with the bench tokenizer:

- float32: numpy draws, as rollout.testing.make_bench_checkpoint has always written them (the
  CPU figures of docs/benchmarks.md were taken on these bits);
- bfloat16: each tensor drawn on JAX's default device (`device_draw`: an accelerator makes the
  16 GB of the 8B model in seconds where numpy takes minutes), copied to the host in
  bfloat16 and written to safetensors shards of SHARD_BYTES, one shard in host memory at a
  time (never a float32 copy of the model).

Both draw each tensor from rollout.testing.init_mean_std (embeddings N(0, 1), projections
N(0, 1/fan_in), residual outputs x12, norms 1 + N(0, 0.1)), so greedy decoding is clearly
decided; the two draws give different values for the same seed.
"""

from __future__ import annotations

import functools
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from rollout.testing import (
    BENCH_QWEN3,
    TensorDraw,
    checkpoint_config,
    checkpoint_tensors,
    init_mean_std,
    make_bench_checkpoint,
    write_random_checkpoint,
)

# Qwen3's real vocabulary; the bench tokenizer uses its first few hundred ids.
QWEN3_VOCAB = 151936

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(  # ~0.1M: a smoke run of the whole pipeline (tests; a first accelerator call)
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    ),
    "qwen3-75m": {},  # hidden 768, 12 q / 4 KV heads, head_dim 64, inter 2048, 8 layers, vocab 32000
    "qwen3-128": dict(  # ~96M: Qwen3's head_dim 128 on a small body
        hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, num_hidden_layers=4, vocab_size=32768,
    ),
    "qwen3-0.6b": dict(  # Qwen3-0.6B's shape: ~0.6e9 parameters, tied embeddings
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=QWEN3_VOCAB, tie_word_embeddings=True, rope_theta=1e6,
        max_position_embeddings=40960,
    ),
    "qwen3-8b": dict(  # Qwen3-8B's shape: ~8.2e9 parameters, an untied output head
        hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=12288, vocab_size=QWEN3_VOCAB, tie_word_embeddings=False, rope_theta=1e6,
        max_position_embeddings=40960,
    ),
}

# Shard size of the bfloat16 checkpoints: the host holds one shard while writing it (a tensor
# larger than this, like the 8B model's 1.2 GB embedding, gets a shard of its own).
SHARD_BYTES = 2 << 30

# Marks a checkpoint directory as complete (written last); `make_checkpoint` reuses such a one.
COMPLETE = "bench-checkpoint.json"


def shape_config(shape: str) -> dict[str, Any]:
    """The config.json of `shape` (nothing is written)."""
    return checkpoint_config("Qwen3ForCausalLM", **{**BENCH_QWEN3, **_overrides(shape)})


def param_count(shape: str) -> int:
    """Parameters of `shape`, from its config alone (a tied embedding counted once).

    >>> round(param_count("qwen3-0.6b") / 1e9, 3), round(param_count("qwen3-8b") / 1e9, 3)
    (0.596, 8.191)
    """
    return sum(math.prod(s) for _, s, _ in checkpoint_tensors(shape_config(shape)))


def _overrides(shape: str) -> dict[str, Any]:
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: expected one of {sorted(SHAPES)}")
    return SHAPES[shape]


def device_draw(dtype: str = "bfloat16") -> TensorDraw:
    """A TensorDraw that draws each tensor on JAX's default device in float32 (one jitted
    program per shape and kind), casts it to `dtype` there and copies it to the host."""
    import jax
    import jax.numpy as jnp

    target = jnp.dtype(dtype)

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def normal(key: jax.Array, shape: tuple[int, ...], mean: float, std: float) -> jax.Array:
        return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(target)

    def draw(name: str, shape: tuple[int, ...], kind: str, seed: int) -> np.ndarray:
        # one key per (seed, tensor name): a tensor does not depend on which others exist
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
        mean, std = init_mean_std(kind, shape)
        return np.asarray(normal(key, shape, mean, std))

    return draw


def make_checkpoint(directory: Path, shape: str, dtype: str = "float32", seed: int = 0) -> Path:
    """The random checkpoint of `shape` in `dtype` under `directory` (see the module docstring);
    a complete one already there (same shape, dtype, seed) is reused."""
    want = {"shape": shape, "dtype": dtype, "seed": seed}
    marker = directory / COMPLETE
    if marker.is_file() and _read_json(marker) == want:
        return directory
    overrides = _overrides(shape)
    if dtype == "float32":
        make_bench_checkpoint(directory, seed, **overrides)
    else:
        write_random_checkpoint(directory, "Qwen3ForCausalLM", seed, {**BENCH_QWEN3, **overrides},
                                shard_max_bytes=SHARD_BYTES, dtype=dtype, draw=device_draw(dtype))
    marker.write_text(_json(want))
    return directory


def timed_checkpoint(directory: Path, shape: str, dtype: str) -> tuple[Path, float]:
    """make_checkpoint and the seconds it took."""
    start = time.perf_counter()
    path = make_checkpoint(directory, shape, dtype)
    return path, time.perf_counter() - start


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
