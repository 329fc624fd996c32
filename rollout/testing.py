"""Public test helpers: tiny Hugging Face-format Qwen3 / Qwen2 / Qwen3-MoE checkpoints, made on the spot.

`make_tiny_checkpoint` writes a complete checkpoint directory that both `rollout` and
transformers (`AutoModelForCausalLM`, `AutoTokenizer`) load, with nothing downloaded:

    config.json                      HF config of Qwen3ForCausalLM, Qwen2ForCausalLM or Qwen3MoeForCausalLM
    model.safetensors                random float32 weights under the exact HF tensor names
      (or model-0000i-of-0000n.safetensors + model.safetensors.index.json when sharded)
    tokenizer.json                   byte-level BPE trained here on a small embedded corpus
    tokenizer_config.json            chatml chat template, eos/pad tokens, added tokens
    generation_config.json           eos_token_id list (<|im_end|>, <|endoftext|>), bos

Weights are deterministic in `seed` and scaled so that the next-token distribution is clearly
peaked (top-1 logit well above top-2), which lets tests compare greedy continuations of two
implementations token by token. `make_bench_checkpoint` writes a ~75M-parameter Qwen3 model with
the same tokenizer for benchmarks. The demo's built-in models also come from here (`rollout demo
--moe`: the tiny Qwen3-MoE, TINY_QWEN3_MOE: per-expert tensors as transformers' save_pretrained
names them, and a router drawn so that each token's top-k experts are clearly apart).

Example:
    >>> path = make_tiny_checkpoint(tmp_path / "qwen3")                      # doctest: +SKIP
    >>> path = make_tiny_checkpoint(tmp_path / "q2", "Qwen2ForCausalLM",     # doctest: +SKIP
    ...                             tie_word_embeddings=False, shard_max_bytes=200_000)
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "ARCHITECTURES",
    "BENCH_QWEN3",
    "CHATML_TEMPLATE",
    "EOS_TOKEN",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TINY_QWEN2",
    "TINY_QWEN3",
    "TINY_QWEN3_MOE",
    "TOKENIZER_SIZE",
    "TensorDraw",
    "checkpoint_config",
    "checkpoint_tensors",
    "init_mean_std",
    "make_bench_checkpoint",
    "make_tiny_checkpoint",
    "tiny_tokenizer_json",
    "write_random_checkpoint",
]

# HF architecture name -> config.json `model_type`.
ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "Qwen3MoeForCausalLM": "qwen3_moe",
}

# Size defaults of the tiny models. head_dim (32) is deliberately != hidden/heads (16) for Qwen3,
# so code that derives head_dim instead of reading it fails loudly.
TINY_QWEN3: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)
# Qwen3-MoE: Qwen3's attention; every layer's MLP is 8 experts of width 32, each token using 2.
TINY_QWEN3_MOE: dict[str, Any] = dict(
    TINY_QWEN3,
    intermediate_size=96,  # of dense layers (none unless mlp_only_layers / decoder_sparse_step say so)
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    output_router_logits=False,
    router_aux_loss_coef=0.001,
)
# Qwen2 has no head_dim in its config: it is hidden_size // num_attention_heads (16 here).
TINY_QWEN2: dict[str, Any] = {k: v for k, v in TINY_QWEN3.items() if k != "head_dim"}

# About 75M parameters (tied): embeddings 24.6M + 8 layers x 6.3M.
BENCH_QWEN3: dict[str, Any] = dict(
    TINY_QWEN3,
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=4096,
)

# Special tokens in id order; they come right after the BPE vocabulary, as in Qwen.
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|endoftext|>"  # Qwen's config bos_token_id; never prepended to prompts

# Default tokenizer size including the special tokens; smaller vocab_size values shrink it.
TOKENIZER_SIZE = 448
_BYTE_ALPHABET = 256  # a byte-level BPE needs every byte as a token to round-trip any UTF-8
MIN_VOCAB_SIZE = _BYTE_ALPHABET + len(SPECIAL_TOKENS)

# Chatml as Qwen writes it. `enable_thinking=False` adds Qwen3's empty think block.
CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('Unknown role ' + message['role'] + '; expected system, user, "
    "assistant or tool') }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] if message['content'] "
    "is defined else '') + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}\n"
    "{{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "{%- endif %}\n"
    "{%- endif %}\n"
)

# Pre-tokenizer split in the spirit of Qwen2's: contractions, letter runs with one leading
# non-letter, single digits (so arithmetic tokenizes digit by digit), punctuation runs, newlines.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Training text for the tiny tokenizer: English, digits and arithmetic, a little Chinese, chat.
_CORPUS = """\
You are a helpful assistant. You answer questions clearly and briefly.
Hello! How are you today? I am fine, thank you. What can I do for you?
The quick brown fox jumps over the lazy dog. The dog was not amused.
Once upon a time there was a little robot who wanted to learn how to write stories.
Every morning the robot read a book, and every evening it wrote a short poem about the sea.
Reinforcement learning trains a policy from rewards. The policy generates rollouts,
the trainer computes advantages, and the weights are updated after each step.
Please think step by step and show your work before you give the final answer.
What is 2 + 2? The answer is 4. What is 12 * 7? The answer is 84.
Compute 123 + 456 = 579. Then 579 - 321 = 258. Finally 258 / 2 = 129.
3.14159 is close to pi, and 2.71828 is close to e. 10 % 3 = 1, 2 ** 10 = 1024.
The numbers 0 1 2 3 4 5 6 7 8 9 are digits; 42, 100, 2024 and 65536 are numbers.
If x = 5 and y = 3, then x + y = 8, x - y = 2, x * y = 15 and x / y = 1.67.
def add(a, b):
    return a + b
print(add(1, 2))  # prints 3
for i in range(10):
    print(i * i)
你是谁？我是一个助手。我可以回答你的问题。
你好！今天天气很好。我们一起学习中文和数学吧。
一加一等于二。二加三等于五。谢谢你的帮助。
The user asked a question, and the assistant wrote an answer.
system
user
assistant
Good morning. Good night. Thank you very much. See you tomorrow.
Water boils at 100 degrees Celsius and freezes at 0 degrees.
The capital of France is Paris. The capital of Japan is Tokyo.
She said: "Let's go to the park." He replied: "That's a great idea!"
Tokens, weights, versions, workers, samples, prompts, and completions.
"""


def tiny_tokenizer_json(vocab_size: int = TINY_QWEN3["vocab_size"]) -> str:
    """The tokenizer.json text of the tiny tokenizer that fits a model of `vocab_size` ids.

    The tokenizer has min(TOKENIZER_SIZE, vocab_size) tokens including the special tokens
    (<|endoftext|>, <|im_start|>, <|im_end|>, last). Deterministic: same text for the same size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the test tokenizer: a byte-level BPE needs "
            f"{_BYTE_ALPHABET} byte tokens plus {len(SPECIAL_TOKENS)} special tokens, so at least "
            f"{MIN_VOCAB_SIZE}. Pass vocab_size >= {MIN_VOCAB_SIZE}."
        )
    return _train_tokenizer(min(TOKENIZER_SIZE, vocab_size))


@functools.lru_cache(maxsize=8)
def _train_tokenizer(num_tokens: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_tokens - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return tokenizer.to_str(pretty=True)


def _special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    assert all(i is not None for i in ids.values()), ids
    return ids


def _base_config(architecture: str) -> dict[str, Any]:
    """The HF config.json keys of `architecture` at tiny defaults (token ids filled in later)."""
    qwen3 = architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    sizes = {"Qwen3ForCausalLM": TINY_QWEN3, "Qwen2ForCausalLM": TINY_QWEN2, "Qwen3MoeForCausalLM": TINY_QWEN3_MOE}
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": ARCHITECTURES[architecture],
        **sizes[architecture],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": True,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": None,  # = num_hidden_layers unless overridden
        "rope_scaling": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    if qwen3:
        config["attention_bias"] = False
    return config


def _build_config(architecture: str, overrides: dict[str, Any], tokenizer: Tokenizer) -> dict:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture={architecture!r} is not one the test checkpoints know; expected one "
            f"of {sorted(ARCHITECTURES)}."
        )
    config = _base_config(architecture)
    fixed = {"architectures", "model_type"}
    unknown = sorted(k for k in overrides if k not in config or k in fixed)
    if unknown:
        hint = ""
        if "head_dim" in unknown and architecture == "Qwen2ForCausalLM":
            hint = " Qwen2 derives head_dim as hidden_size // num_attention_heads."
        allowed = sorted(set(config) - fixed)
        raise TypeError(
            f"make_tiny_checkpoint got unknown config override(s) {unknown} for {architecture}; "
            f"expected keys of its config.json: {allowed}.{hint} Pick the architecture with "
            f"`architecture=` and pass only those keys."
        )
    config.update(overrides)
    if config["max_window_layers"] is None:
        config["max_window_layers"] = config["num_hidden_layers"]
    ids = _special_token_ids(tokenizer)
    if config["bos_token_id"] is None:
        config["bos_token_id"] = ids[BOS_TOKEN]
    if config["eos_token_id"] is None:
        config["eos_token_id"] = ids[EOS_TOKEN]
    _check_shapes(config)
    return config


def _check_shapes(config: dict[str, Any]) -> None:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if heads % kv_heads:
        raise ValueError(
            f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads} "
            f"(grouped-query attention); change one of the two overrides."
        )
    if "head_dim" not in config and config["hidden_size"] % heads:
        raise ValueError(
            f"Qwen2 needs hidden_size ({config['hidden_size']}) divisible by "
            f"num_attention_heads ({heads}) to derive head_dim; change one of the two overrides."
        )


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


# Kinds of tensors, each with its own random init (see _random_tensor).
_EMBED, _LINEAR, _RESIDUAL_OUT, _BIAS, _NORM, _ROUTER = "embed", "linear", "residual_out", "bias", "norm", "router"


def _sparse_layers(config: dict[str, Any]) -> set[int]:
    """Layers whose MLP is a sparse MoE block, as transformers' Qwen3MoeDecoderLayer decides."""
    if not config.get("num_experts"):
        return set()
    step, dense = config["decoder_sparse_step"], set(config["mlp_only_layers"])
    return {i for i in range(config["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0}


def _mlp_specs(config: dict[str, Any], p: str, sparse: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """The MLP tensors of layer prefix `p`: dense, or a router and per-expert SwiGLUs."""
    hidden = config["hidden_size"]
    if not sparse:
        inter = config["intermediate_size"]
        return [
            (f"{p}.mlp.gate_proj.weight", (inter, hidden), _LINEAR),
            (f"{p}.mlp.up_proj.weight", (inter, hidden), _LINEAR),
            (f"{p}.mlp.down_proj.weight", (hidden, inter), _RESIDUAL_OUT),
        ]
    inter = config["moe_intermediate_size"]
    specs: list[tuple[str, tuple[int, ...], str]] = [(f"{p}.mlp.gate.weight", (config["num_experts"], hidden), _ROUTER)]
    for e in range(config["num_experts"]):
        specs += [
            (f"{p}.mlp.experts.{e}.gate_proj.weight", (inter, hidden), _LINEAR),
            (f"{p}.mlp.experts.{e}.up_proj.weight", (inter, hidden), _LINEAR),
            (f"{p}.mlp.experts.{e}.down_proj.weight", (hidden, inter), _RESIDUAL_OUT),
        ]
    return specs


def _tensor_specs(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, init kind) of every tensor of the checkpoint, in HF order."""
    hidden = config["hidden_size"]
    vocab, head_dim = config["vocab_size"], _head_dim(config)
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    qwen3 = config["model_type"] in ("qwen3", "qwen3_moe")
    sparse = _sparse_layers(config)
    qkv_bias = not qwen3 or bool(config.get("attention_bias"))
    o_bias = qwen3 and bool(config.get("attention_bias"))

    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, hidden), _EMBED)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (hidden,), _NORM),
            (f"{p}.self_attn.q_proj.weight", (q_dim, hidden), _LINEAR),
            (f"{p}.self_attn.k_proj.weight", (kv_dim, hidden), _LINEAR),
            (f"{p}.self_attn.v_proj.weight", (kv_dim, hidden), _LINEAR),
        ]
        if qkv_bias:
            specs += [
                (f"{p}.self_attn.q_proj.bias", (q_dim,), _BIAS),
                (f"{p}.self_attn.k_proj.bias", (kv_dim,), _BIAS),
                (f"{p}.self_attn.v_proj.bias", (kv_dim,), _BIAS),
            ]
        if qwen3:
            specs += [
                (f"{p}.self_attn.q_norm.weight", (head_dim,), _NORM),
                (f"{p}.self_attn.k_norm.weight", (head_dim,), _NORM),
            ]
        specs.append((f"{p}.self_attn.o_proj.weight", (hidden, q_dim), _RESIDUAL_OUT))
        if o_bias:
            specs.append((f"{p}.self_attn.o_proj.bias", (hidden,), _BIAS))
        specs.append((f"{p}.post_attention_layernorm.weight", (hidden,), _NORM))
        specs += _mlp_specs(config, p, i in sparse)
    specs.append(("model.norm.weight", (hidden,), _NORM))
    if not config["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (vocab, hidden), _EMBED))
    return specs


# Init scales. Embeddings (and an untied lm_head) ~ N(0, 1) give logits with a std of about
# sqrt(hidden) after the final RMSNorm, so the next-token distribution is peaked. The layers that
# write into the residual stream (o_proj, down_proj) are scaled up so that, with tied
# embeddings, the hidden state is not dominated by the input token's own embedding: at gain 1,
# 99% of greedy steps repeated the previous token (which would hide attention bugs); at 12 about
# half do. Measured with transformers on the tiny Qwen3, seed 0, 8 prompts x 32 greedy steps:
# top1-top2 logit gap median 2.3, 1st percentile 0.08, min 0.007, against a float32-vs-float64
# logit error of 3e-5.
_RESIDUAL_OUT_GAIN = 12.0
_ROUTER_GAIN = 4.0  # router logits of std ~4: each token's top-k experts are well apart
_NORM_JITTER = 0.1
_BIAS_STD = 0.1

# A tensor source other than numpy (e.g. drawn on an accelerator): (HF name, shape, init kind,
# seed) -> the array in the checkpoint's dtype, with the init_mean_std of its kind.
TensorDraw = Callable[[str, tuple[int, ...], str, int], np.ndarray]


def init_mean_std(kind: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """The normal distribution (mean, std) a tensor of init `kind` and `shape` is drawn from.

    >>> init_mean_std("linear", (3072, 1024)), init_mean_std("norm", (1024,))
    ((0.0, 0.03125), (1.0, 0.1))
    """
    fan_in = math.sqrt(shape[-1])
    table = {
        _EMBED: (0.0, 1.0),
        _LINEAR: (0.0, 1.0 / fan_in),
        _RESIDUAL_OUT: (0.0, _RESIDUAL_OUT_GAIN / fan_in),
        _ROUTER: (0.0, _ROUTER_GAIN / fan_in),
        _BIAS: (0.0, _BIAS_STD),
        _NORM: (1.0, _NORM_JITTER),
    }
    if kind not in table:
        raise ValueError(f"init kind {kind!r}: expected one of {sorted(table)}")
    return table[kind]


def _random_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int) -> np.ndarray:
    """float32 N(init_mean_std(kind, shape)), drawn as std x N(0, 1) + mean in float32."""
    # One generator per (seed, tensor name): a tensor does not depend on which others exist.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    mean, std = init_mean_std(kind, shape)
    x = rng.standard_normal(shape, dtype=np.float32)  # (out, in) for linear layers
    if std != 1.0:
        x *= np.float32(std)
    if mean != 0.0:
        x += np.float32(mean)
    return x


def _shards(
    specs: list[tuple[str, tuple[int, ...], str]], shard_max_bytes: int, itemsize: int = 4
) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """Greedy split in HF order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = itemsize * int(np.prod(spec[1]))
        if shards[-1] and size + nbytes > shard_max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _numpy_draw(dtype: np.dtype) -> TensorDraw:
    """_random_tensor (float32, the tests' weights) cast to `dtype`."""

    def draw(name: str, shape: tuple[int, ...], kind: str, seed: int) -> np.ndarray:
        x = _random_tensor(name, shape, kind, seed)
        return x if x.dtype == dtype else x.astype(dtype)

    return draw


def _write_weights(
    path: pathlib.Path, config: dict[str, Any], seed: int, shard_max_bytes: int | None,
    dtype: np.dtype = np.dtype(np.float32), draw: TensorDraw | None = None,
) -> None:
    specs = _tensor_specs(config)
    metadata = {"format": "pt"}  # transformers reads safetensors files marked as PyTorch
    draw = draw or _numpy_draw(dtype)

    def drawn(name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
        x = draw(name, shape, kind, seed)
        if x.dtype != dtype or tuple(x.shape) != shape:
            raise ValueError(f"the tensor draw gave {name} as {x.dtype} {tuple(x.shape)}, expected {dtype} {shape}")
        return x

    if shard_max_bytes is None:
        tensors = {n: drawn(n, s, k) for n, s, k in specs}
        save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
        return
    shards = _shards(specs, shard_max_bytes, dtype.itemsize)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: drawn(n, s, k) for n, s, k in shard}
        save_file(tensors, str(path / filename), metadata=metadata)
        for name, array in tensors.items():
            weight_map[name] = filename
            total += array.nbytes
        del tensors  # one shard in host memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(path / "model.safetensors.index.json", index)


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        # Byte-level BPE decodes exactly; cleanup would drop spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_checkpoint(
    path: str | os.PathLike[str],
    architecture: str = "Qwen3ForCausalLM",
    seed: int = 0,
    *,
    shard_max_bytes: int | None = None,
    **overrides: Any,
) -> pathlib.Path:
    """Write a tiny random HF checkpoint (weights, config, tokenizer) into `path`; return it.

    Args:
        path: directory to write (created if missing; existing checkpoint files are replaced).
        architecture: "Qwen3ForCausalLM", "Qwen2ForCausalLM" or "Qwen3MoeForCausalLM"
            (TINY_QWEN3_MOE sizes; `num_experts=...`, `mlp_only_layers=[...]` etc. override).
        seed: weights are a pure function of (seed, tensor name, shape).
        shard_max_bytes: if set, split the weights into model-0000i-of-0000n.safetensors files
            of at most this many bytes (one tensor may exceed it alone) plus
            model.safetensors.index.json, as HF does for large models.
        **overrides: any config.json key, e.g. vocab_size=300, tie_word_embeddings=False,
            num_hidden_layers=1, attention_bias=True (Qwen3). Unknown keys raise TypeError.

    The tokenizer has min(TOKENIZER_SIZE, vocab_size) tokens, so every id it makes is a valid
    row of the embedding; a vocab_size below MIN_VOCAB_SIZE raises ValueError.
    """
    return write_random_checkpoint(path, architecture, seed, overrides, shard_max_bytes=shard_max_bytes)


def write_random_checkpoint(
    path: str | os.PathLike[str],
    architecture: str,
    seed: int,
    overrides: dict[str, Any],
    *,
    shard_max_bytes: int | None = None,
    dtype: str = "float32",
    draw: TensorDraw | None = None,
) -> pathlib.Path:
    """make_tiny_checkpoint(path, architecture, seed, shard_max_bytes=..., **overrides), and:

    dtype: "float32" or "bfloat16": the tensors' dtype and the config's torch_dtype.
    draw: where tensors come from (TensorDraw; default: numpy, float32 cast to `dtype`), called
        one tensor at a time, so that a model larger than host memory can be written (sharded).
    """
    if shard_max_bytes is not None and shard_max_bytes <= 0:
        raise ValueError(
            f"shard_max_bytes must be a positive byte count, got {shard_max_bytes}; pass None "
            f"for a single model.safetensors."
        )
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: the test checkpoints are written in 'float32' or 'bfloat16'")
    vocab_size = overrides.get("vocab_size", TINY_QWEN3["vocab_size"])
    tokenizer_json = tiny_tokenizer_json(vocab_size)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    config = _build_config(architecture, {"torch_dtype": dtype, **overrides}, tokenizer)

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a rewrite must not leave a previous layout's files
    _write_json(out / "config.json", config)
    _write_weights(out, config, seed, shard_max_bytes, _numpy_dtype(dtype), draw)

    ids = _special_token_ids(tokenizer)
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config(ids))
    generation_config = {
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": [ids[EOS_TOKEN], ids["<|endoftext|>"]],
        "pad_token_id": ids[PAD_TOKEN],
        "do_sample": False,
    }
    _write_json(out / "generation_config.json", generation_config)
    return out


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def checkpoint_config(architecture: str = "Qwen3ForCausalLM", **overrides: Any) -> dict[str, Any]:
    """The config.json make_tiny_checkpoint(architecture, **overrides) writes (nothing is written)."""
    vocab_size = overrides.get("vocab_size", TINY_QWEN3["vocab_size"])
    return _build_config(architecture, overrides, Tokenizer.from_str(tiny_tokenizer_json(vocab_size)))


def checkpoint_tensors(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, init kind) of every tensor a checkpoint of `config` holds, in HF order
    (a tied output head is not a tensor of its own)."""
    return _tensor_specs(config)


def make_bench_checkpoint(
    path: str | os.PathLike[str], seed: int = 0, **overrides: Any
) -> pathlib.Path:
    """A ~75M-parameter Qwen3 checkpoint (BENCH_QWEN3 sizes, tied, float32, ~300 MB) for
    benchmarks, with the tiny tokenizer (its vocab is just larger than the tokenizer)."""
    return make_tiny_checkpoint(path, "Qwen3ForCausalLM", seed, **{**BENCH_QWEN3, **overrides})
