"""Structured output's cost: tokens/s of constrained sampling against free sampling.

The same engine, prompts and sampling (temperature 1, a seed per batch) generate free and
under `SamplingParams.regex="[a-z ]+"` (lowercase words: a constraint that never completes, so
both sides sample max_tokens tokens per row and the batch stays full), alternating, best of
--repeats. The constrained side's extra time per token is the host's mask work (llguidance,
rows in parallel) plus the one-step decode calls a constrained row needs
(rollout.engine.structured). A JSON-schema run then checks that every sample that completed
parses as JSON (its tokens/s is not comparable: samples finish at different lengths).

The model is the agent benchmark's Qwen3 shape (~29M parameters, float32, 1 CPU device) with a
32,000-token byte-level BPE trained on the spot on the Python standard library's sources
(~2 s): the mask work grows with the vocabulary, so the tests' 448-token tokenizer would
understate it (real checkpoints have 150k tokens: more again).

    rollout bench structured                       # batches 1 and 16
    rollout bench structured --batches 1 4 16 --max-tokens 96
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rollout.bench.agent import SHAPE, TINY_SHAPE  # imports no jax

WORDS = "[a-z ]+"  # the throughput side's constraint: never complete, most tokens of a BPE allowed
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rollout bench structured", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per sample at most")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch and side (best kept)")
    p.add_argument("--decode-steps", type=int, default=4, help="the engine's decode_steps (its default)")
    p.add_argument("--tiny", action="store_true", help="the agent bench's tiny model (512 tokens), batches 1 and 2")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.batches, args.max_tokens, args.repeats = [1, 2], 8, 1
    return args


def train_tokenizer(size: int) -> str:
    """tokenizer.json text of a byte-level BPE of `size` tokens (<|endoftext|> = id 0) trained on
    the standard library's top-level sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts() -> Any:
        for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
            try:
                yield Path(path).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator(texts(), trainer)
    if tokenizer.get_vocab_size() != size:
        raise RuntimeError(f"the BPE came out with {tokenizer.get_vocab_size()} tokens, not {size}: too little text")
    return tokenizer.to_str()


def make_checkpoint(directory: Path, shape: dict[str, Any] = SHAPE) -> Path:
    """The agent bench's random Qwen3 with the trained tokenizer (EOS <|endoftext|>, id 0)."""
    from rollout.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(directory, **shape)
    (ckpt / "tokenizer.json").write_text(train_tokenizer(shape["vocab_size"]))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (ckpt / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(eos_token_id=0, bos_token_id=0, pad_token_id=0)
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "generation_config.json").unlink(missing_ok=True)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from rollout.engine import EngineConfig, SamplingParams
    from rollout.engine.native.engine import Engine

    root = Path(tempfile.mkdtemp(prefix="rollout-bench-structured-"))
    shape = TINY_SHAPE if args.tiny else SHAPE
    ckpt = make_checkpoint(root / "qwen3-structured", shape)
    prompts = [f"Describe person number {i} as JSON:" for i in range(max(args.batches))]
    config = EngineConfig(max_batch=max(args.batches), max_seq_len=256, decode_steps=args.decode_steps)
    rows = []
    with Engine(ckpt, config, devices=jax.devices()[:1]) as engine:
        for batch in args.batches:
            free = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=batch, ignore_eos=True)
            sides = {"free": free, "regex": dataclasses.replace(free, regex=WORDS)}
            per_token = dict.fromkeys(sides, float("inf"))  # best seconds per token
            for round_ in range(args.repeats + 1):  # round 0 compiles (not kept)
                for name, sampling in sides.items():
                    start = time.perf_counter()
                    out = engine.generate(prompts[:batch], sampling)
                    if round_:
                        tokens = sum(len(c.token_ids) for c in out)
                        per_token[name] = min(per_token[name], (time.perf_counter() - start) / tokens)
            out = engine.generate(prompts[:batch], dataclasses.replace(free, ignore_eos=False, json_schema=SCHEMA))
            finished = [c for c in out if c.finish_reason == "stop"]
            parsed = sum(_parses(c.text) for c in finished)
            rate = {name: 1.0 / t for name, t in per_token.items()}
            extra_ms = 1e3 * (per_token["regex"] - per_token["free"])
            rows.append(dict(batch=batch, free_tok_s=rate["free"], regex_tok_s=rate["regex"],
                             ratio=rate["regex"] / rate["free"], extra_ms_per_token=extra_ms,
                             json_finished=len(finished), json_parsed=parsed, samples=batch))
            print(f"batch {batch}: free {rate['free']:.1f} tok/s, regex {rate['regex']:.1f} tok/s "
                  f"({rate['regex'] / rate['free']:.2f}x; {extra_ms:+.2f} ms per token); json_schema: "
                  f"{parsed}/{len(finished)} completed samples parse ({batch - len(finished)} hit max_tokens)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(vocab=shape["vocab_size"], decode_steps=args.decode_steps, rows=rows), indent=2))
    return 0


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
