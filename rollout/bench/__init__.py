"""Benchmarks that ship with the package: `rollout bench NAME [options]`.

Each is a module with `main(argv) -> exit code`; the figures in the README come from them.
`python -m rollout.bench NAME [options]` runs one from a copy of the repository (no install).
"""

BENCHMARKS = {
    "engine": "rollout.bench.engine",  # engine tokens/s against transformers' generate
    "sync": "rollout.bench.sync",  # sync_weights against a put + get + place floor and per-tensor calls
    "paged": "rollout.bench.paged",  # paged vs contiguous KV on one memory budget; both against transformers
    "agent": "rollout.bench.agent",  # multi-turn conversations on the paged engine, prefix cache on vs off
    "serve": "rollout.bench.serve",  # the HTTP server against the Python API (needs the serve extra)
    "backends": "rollout.bench.backends",  # native vs sglang-jax vs transformers, same checkpoint (head_dim 128)
    "levers": "rollout.bench.levers",  # one decode step's matmuls in each form (fused, (out, in), bfloat16, XLA flags)
    "structured": "rollout.bench.structured",  # JSON-schema-constrained sampling against free sampling
    "fanout": "rollout.bench.fanout",  # bytes the coordinator's node sends per sync to 1/2/4 worker nodes, relay off/on
}
