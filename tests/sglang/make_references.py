"""Host-side step of the sglang-jax tests: tiny head_dim-128 checkpoints and transformers' greedy
tokens on them, written to a directory that the tests inside the Python 3.13 root read.

    python tests/sglang/make_references.py OUT_DIR      (in the host venv of `.[test]`)

torch for Python 3.13 is only on the index as a multi-GB CUDA build, so transformers, the
numerical reference, runs here (Python 3.11, torch CPU) and the root gets its tokens as JSON.
OUT_DIR/a and OUT_DIR/b are two checkpoints of the same shapes (seeds 1 and 2); refs.json holds
the prompts (token ids), the number of new tokens and each checkpoint's greedy continuations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/hf_reference.py

# Qwen3-shaped, head_dim 128 (sglang-jax pads smaller head dims), GQA 4:2, tied embeddings.
CHECKPOINT = dict(head_dim=128, num_hidden_layers=2)
SEEDS = {"a": 1, "b": 2}
MAX_NEW_TOKENS = 16
PROMPTS = [
    "Hello! How are you today?",
    "Reinforcement learning trains a policy from rewards. The policy generates rollouts, and the trainer",
    "What is 12 * 7?",
]


def main(out: Path) -> None:
    from rollout.testing import make_tiny_checkpoint
    from rollout.tokenizer import Tokenizer

    from hf_reference import hf_greedy

    out.mkdir(parents=True, exist_ok=True)
    paths = {name: make_tiny_checkpoint(out / name, "Qwen3ForCausalLM", seed=seed, **CHECKPOINT) for name, seed in SEEDS.items()}
    tokenizer = Tokenizer.from_pretrained(paths["a"])
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    refs = {
        "checkpoint": CHECKPOINT,
        "seeds": SEEDS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "prompts": prompts,
        "greedy": {name: [hf_greedy(path, ids, MAX_NEW_TOKENS) for ids in prompts] for name, path in paths.items()},
    }
    (out / "refs.json").write_text(json.dumps(refs, indent=1))
    print(f"wrote {out}/refs.json and checkpoints {sorted(paths)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/sglang/make_references.py OUT_DIR")
    main(Path(sys.argv[1]))
