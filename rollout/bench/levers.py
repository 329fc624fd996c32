"""What each form of a decode step's matmuls costs on this host: the engine-speed levers, measured.

A decode step's time is its matmuls' (attention, norms and sampling are a few percent at
these sizes; see docs/benchmarks.md). How fast XLA multiplies depends on the form it is handed,
and which form wins depends on the host (its cores, caches, and XLA:CPU's choice of kernel for
each shape), so this benchmark times, in one process and alternating, one decode step of a
model's shapes (every layer's projections, RMSNorms, the SiLU gate, the residuals and the LM head,
over distinct weights far larger than the last-level cache, so they stream from memory as the
engine's do) in each form:

- `baseline`: the engine's form: separate q/k/v and gate/up kernels, x (B, in) @ W (in, out);
- `fused`: q/k/v in one (in, q+k+v) kernel and gate/up in one (in, 2 x inter): fewer, wider
  matmuls (what sglang and vLLM do on GPUs);
- `out_in`: kernels stored (out, in) (HF's layout) and multiplied as the dot's left operand,
  W (out, in) . x (B, in) -> (out, B), transposed back: another kernel choice in XLA:CPU;
- `fused_out_in`: both;
- `bfloat16`: the baseline with weights and activations in bfloat16 (half the bytes to read;
  how fast the dots run depends on XLA:CPU's kernels for the host: on an AVX-512 BF16 AMD EPYC
  they ran at 0.4-0.8x float32, while torch's bfloat16 matmuls ran 2.4x JAX's).

and `--xla-flags` runs the baseline again in a subprocess per flag set (XLA reads its flags
once per process). Every form computes the same step: `step` returns the same logits (the
tests check it); only time differs. It prints each form's time per step and its speed
relative to the baseline at each batch size (> 1: faster), with the host's CPU model.

    rollout bench levers --shape qwen3-128 --batches 1 4 16 64
    rollout bench levers --xla-flags="--xla_cpu_use_xnnpack=true" --xla-flags="--xla_cpu_multi_thread_eigen=false"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rollout.bench.checkpoints import SHAPES
from rollout.testing import BENCH_QWEN3

FORMS = ("baseline", "fused", "out_in", "fused_out_in", "bfloat16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rollout bench levers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-75m", help="the model shape whose step is timed")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64], help="decode batch sizes")
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="forms to time (baseline always)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each form once per round; best is kept)")
    p.add_argument("--steps", type=int, default=4, help="decode steps per timed call (one jitted scan)")
    p.add_argument("--xla-flags", action="append", default=[], metavar="FLAGS",
                   help='an XLA_FLAGS set to time the baseline under, in its own process (repeatable; write '
                   '--xla-flags="--xla_cpu_..." with the "=")')
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def shape_sizes(shape: str) -> dict[str, int]:
    """hidden, q (heads x head_dim), kv, inter, layers, vocab of a bench shape.

    >>> shape_sizes("qwen3-128")
    {'hidden': 1024, 'q': 2048, 'kv': 1024, 'inter': 3072, 'layers': 4, 'vocab': 32768}
    """
    cfg = {**BENCH_QWEN3, **SHAPES[shape]}
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return dict(hidden=cfg["hidden_size"], q=cfg["num_attention_heads"] * head_dim,
                kv=cfg["num_key_value_heads"] * head_dim, inter=cfg["intermediate_size"],
                layers=cfg["num_hidden_layers"], vocab=cfg["vocab_size"])


def make_weights(sizes: dict[str, int], seed: int = 0) -> dict[str, Any]:
    """The baseline form's weights, numpy float32: per layer q, k, v, o, gate, up, down as
    (in, out), and the head (hidden, vocab); N(0, 1/fan_in) so activations stay O(1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, q, kv, i = sizes["hidden"], sizes["q"], sizes["kv"], sizes["inter"]

    def draw(d_in: int, d_out: int) -> Any:
        return (rng.standard_normal((d_in, d_out), dtype=np.float32) / np.sqrt(d_in)).astype(np.float32)

    layers = [dict(q=draw(h, q), k=draw(h, kv), v=draw(h, kv), o=draw(q, h), gate=draw(h, i), up=draw(h, i),
                   down=draw(i, h)) for _ in range(sizes["layers"])]
    return dict(layers=layers, head=draw(h, sizes["vocab"]))


def form_weights(weights: dict[str, Any], form: str) -> dict[str, Any]:
    """`weights` (the baseline's, numpy) as `form` holds them, as JAX arrays."""
    import jax.numpy as jnp
    import numpy as np

    fused, out_in = form.startswith("fused"), form.endswith("out_in")
    dtype = jnp.bfloat16 if form == "bfloat16" else jnp.float32

    def put(w: Any) -> Any:
        return jnp.asarray(np.ascontiguousarray(w.T) if out_in else w, dtype)

    layers = []
    for lw in weights["layers"]:
        if fused:
            layers.append(dict(qkv=put(np.concatenate([lw["q"], lw["k"], lw["v"]], 1)), o=put(lw["o"]),
                               gate_up=put(np.concatenate([lw["gate"], lw["up"]], 1)), down=put(lw["down"])))
        else:
            layers.append({name: put(w) for name, w in lw.items()})
    return dict(layers=layers, head=put(weights["head"]))


def step(form: str, sizes: dict[str, int]) -> Callable[[Any, Any], Any]:
    """One decode step of `form` (unjitted): (weights as form_weights gives them, x (B, hidden))
    -> float32 logits (B, vocab). Attention is left out (the engine's reads the KV cache, the
    same in every form); its input and output projections are in."""
    import jax
    import jax.numpy as jnp

    out_in, fused = form.endswith("out_in"), form.startswith("fused")
    q, kv, inter = sizes["q"], sizes["kv"], sizes["inter"]

    def mm(x: Any, w: Any) -> Any:
        if out_in:  # W (out, in) . x (B, in) -> (out, B) -> (B, out)
            return jax.lax.dot_general(w, x, (((1,), (1,)), ((), ()))).T
        return x @ w

    def norm(x: Any) -> Any:
        xf = x.astype(jnp.float32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)

    def run(weights: dict[str, Any], x: Any) -> Any:
        x = x.astype(weights["head"].dtype)
        for lw in weights["layers"]:
            hn = norm(x)
            if fused:
                qkv = mm(hn, lw["qkv"])
                qs, ks, vs = qkv[:, :q], qkv[:, q : q + kv], qkv[:, q + kv :]
            else:
                qs, ks, vs = mm(hn, lw["q"]), mm(hn, lw["k"]), mm(hn, lw["v"])
            # attention's stand-in: q carries the step, k and v join it (every projection is used)
            reps = q // kv
            attn = qs * jax.nn.sigmoid(jnp.tile(ks, (1, reps))) + jnp.tile(vs, (1, reps))
            x = x + mm(attn, lw["o"])
            hn = norm(x)
            if fused:
                gu = mm(hn, lw["gate_up"])
                gate, up = gu[:, :inter], gu[:, inter:]
            else:
                gate, up = mm(hn, lw["gate"]), mm(hn, lw["up"])
            x = x + mm(jax.nn.silu(gate) * up, lw["down"])
        return mm(norm(x), weights["head"]).astype(jnp.float32)

    return run


def decode_loop(form: str, sizes: dict[str, int], steps: int) -> Callable[[Any, Any], Any]:
    """`steps` decode steps in one jitted scan (as the engine runs several per call): each
    step feeds the previous logits' argmax rows back through a fixed projection."""
    import jax
    import jax.numpy as jnp

    one = step(form, sizes)

    def run(weights: dict[str, Any], x: Any) -> Any:
        def body(carry: Any, _: Any) -> tuple[Any, Any]:
            logits = one(weights, carry)
            feed = jnp.max(logits, axis=-1, keepdims=True) * 1e-3  # (B, 1): depends on every logit
            return carry + feed, jnp.argmax(logits, axis=-1)
        _, tokens = jax.lax.scan(body, x, None, length=steps)
        return tokens

    return jax.jit(run)


def time_forms(shape: str, batches: Sequence[int], forms: Sequence[str], repeats: int, steps: int) -> list[dict]:
    """Per batch, each form's best time per decode step (ms), the forms alternating in rounds."""
    import jax
    import numpy as np

    sizes = shape_sizes(shape)
    base = make_weights(sizes)
    forms = ["baseline", *[f for f in forms if f != "baseline"]]
    held = {f: form_weights(base, f) for f in forms}
    loops = {f: decode_loop(f, sizes, steps) for f in forms}
    rng = np.random.default_rng(1)
    rows = []
    for batch in batches:
        x = jax.numpy.asarray(rng.standard_normal((batch, sizes["hidden"]), dtype=np.float32))
        for f in forms:
            jax.block_until_ready(loops[f](held[f], x))  # compile
        best = {f: float("inf") for f in forms}
        for _ in range(repeats):
            for f in forms:
                time.sleep(0.2)  # let the other form's spinning worker threads go idle
                start = time.perf_counter()
                jax.block_until_ready(loops[f](held[f], x))
                best[f] = min(best[f], (time.perf_counter() - start) / steps)
        rows.append(dict(batch=batch, ms={f: 1e3 * t for f, t in best.items()},
                         speedup={f: best["baseline"] / t for f, t in best.items()}))
    return rows


def flag_run(args: argparse.Namespace, flags: str) -> list[dict]:
    """The baseline under XLA_FLAGS=`flags` (plus whatever is set already), in a subprocess."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "rollout.bench", "levers", "--shape", args.shape, "--forms", "baseline",
           "--repeats", str(args.repeats), "--steps", str(args.steps), "--batches", *map(str, args.batches),
           "--json"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "levers.json")
        subprocess.run([*cmd, str(path)], env=env, check=True, capture_output=True, text=True)
        return json.loads(path.read_text())["rows"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from rollout.bench.host import cpu_model

    rows = time_forms(args.shape, args.batches, args.forms, args.repeats, args.steps)
    flag_rows = {flags: flag_run(args, flags) for flags in args.xla_flags}
    if args.json:
        args.json.write_text(
            json.dumps(dict(shape=args.shape, cpu=cpu_model().describe(), rows=rows, xla_flags=flag_rows), indent=2)
        )
    sizes = shape_sizes(args.shape)
    print(f"host: {cpu_model().describe()}")
    print(f"one decode step of {args.shape} ({sizes}), float32 unless named, best of {args.repeats} rounds, "
          "forms alternating; ms per step (speed vs baseline, > 1 is faster)")
    forms = list(rows[0]["ms"])
    print(f"{'batch':>5} " + " ".join(f"{f:>20}" for f in forms))
    for r in rows:
        print(f"{r['batch']:>5} " + " ".join(f"{r['ms'][f]:>11.2f} ({r['speedup'][f]:.2f}x)" for f in forms))
    for flags, frows in flag_rows.items():
        cells = ", ".join(f"batch {fr['batch']}: {fr['ms']['baseline']:.2f} ms "
                          f"({r['ms']['baseline'] / fr['ms']['baseline']:.2f}x)" for r, fr in zip(rows, frows))
        print(f"baseline with XLA_FLAGS={flags}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
