"""The native JAX engine: intake, scheduler, runner (jitted prefill and multi-step decode),
sampling, scoring. Its KV cache layouts are plug-ins under `kv/` (contiguous slots or a paged
pool), chosen by `kv.make_layout` from `EngineConfig.kv_layout`.

Importing this package does not import jax.
"""
