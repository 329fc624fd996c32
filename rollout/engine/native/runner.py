"""ModelRunner: the jitted prefill and multi-step decode over one device mesh.

The runner owns the KV cache and the current parameter leaves. Its jitted functions take the
parameters as arguments, so swapping in new leaves of identical shapes, dtypes and shardings
reuses the compiled executables. Shapes are bucketed (prompt length and prefill batch to powers
of two, attention span to powers of two) so the number of executables stays small and fixed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rollout.engine import placement
from rollout.engine.native.jit_cache import compiled_executables
from rollout.engine.native.sampling import SlotSampling, call_steps, sample_top
from rollout.models import forward, invariant
from rollout.models.bind import ModelDef
from rollout.models.moe import RouteRecorder
from rollout.models.sharding import cache_sharding, logical_sharding

Params = dict[str, jax.Array]
Derived = dict[str, jax.Array]  # serving-only leaves computed from Params (see ModelRunner.derive)

MIN_PREFILL_LEN = 16  # the shortest prompt bucket: shorter prompts share one executable


def pow2_at_least(n: int, floor: int = 1) -> int:
    """>>> pow2_at_least(5), pow2_at_least(1, floor=16), pow2_at_least(64)
    (8, 16, 64)"""
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def alternatives_to_host(top: tuple[jax.Array, jax.Array], sampling: SlotSampling) -> tuple[np.ndarray, np.ndarray] | None:
    """A step's top-k alternatives (ids, logprobs) on the host, or None when none were asked for."""
    if sampling.top_n == 0:
        return None
    return np.asarray(top[0]), np.asarray(top[1])


class ModelRunner:
    def __init__(
        self,
        model_def: ModelDef,
        mesh: Mesh,
        *,
        max_batch: int,
        max_seq_len: int,
        decode_steps: int,
        batch_invariant: bool = False,
    ):
        self.model_def = model_def
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.decode_steps = decode_steps
        cfg = model_def.config
        self.param_shardings = model_def.shardings(mesh)
        kv_sharding = cache_sharding(mesh, cfg)
        shape = forward.cache_shape(cfg, max_batch, max_seq_len)
        make = jax.jit(
            lambda: tuple(
                (jnp.zeros(shape, model_def.dtype), jnp.zeros(shape, model_def.dtype))
                for _ in range(cfg.num_layers)
            ),
            out_shardings=tuple((kv_sharding, kv_sharding) for _ in range(cfg.num_layers)),
        )
        self.cache = make()  # per layer (k, v), each (max_batch, kv_heads, max_seq_len, head_dim)
        self.params: Params | None = None
        self.derived: Derived = {}
        self._transpose_head = None
        # the top-k alternatives of the last prefill/decode call, on the host (None when its
        # sampling rows asked for none): ids, logprobs (rows, top_n) / (K, rows, top_n)
        self.alternatives: tuple[np.ndarray, np.ndarray] | None = None
        if cfg.tie_word_embeddings and mesh.devices.flat[0].platform == "cpu":
            # The sharding an untied (hidden, vocab) lm_head kernel gets: vocab-parallel.
            head_sharding = logical_sharding(model_def.axes["embed_tokens"][::-1], mesh, cfg)
            self._transpose_head = jax.jit(lambda embed: embed.T, out_shardings=head_sharding)
        # batch_invariant: the model traced in rollout.models.invariant's mode
        self._prefill = jax.jit(invariant.traced(self._prefill_impl, batch_invariant), donate_argnums=(2,))
        self._decode = jax.jit(
            invariant.traced(self._decode_impl, batch_invariant), donate_argnums=(2,), static_argnames=("kv_len", "steps")
        )

    # -- compiled functions -------------------------------------------------------------------

    def _prefill_impl(self, params, derived, cache, tokens, lengths, dst_slots, src_rows, sampling: SlotSampling):
        model = self.model_def.bind(params)
        recorder = RouteRecorder(self.model_def.config.num_experts_per_tok)
        logits, cache = forward.prefill(
            model, cache, tokens, lengths, dst_slots, src_rows, derived.get("head_t"), route=recorder
        )
        row_logits = logits[src_rows]  # (M, V): each destination slot samples its own first token
        new_tokens, logprobs, top = sample_top(row_logits, sampling, lengths[src_rows])
        return new_tokens, logprobs, cache, recorder.routes(tokens.shape), top  # routes (B, P, moe layers, k)

    def _decode_impl(
        self, params, derived, cache, slot_ids, tokens, positions, sampling: SlotSampling, *, kv_len: int, steps: int
    ):
        model = self.model_def.bind(params)
        in_place = slot_ids.shape[0] == self.max_batch  # decode() checked that row i is slot i

        def step(carry, _):
            cache, tok, pos = carry
            recorder = RouteRecorder(self.model_def.config.num_experts_per_tok)
            logits, cache = forward.decode(
                model, cache, slot_ids, tok, pos, kv_len, derived.get("head_t"), in_place=in_place, route=recorder
            )
            nxt, lp, top = sample_top(logits, sampling, pos + 1)
            return (cache, nxt, pos + 1), (nxt, lp, recorder.routes(tok[:, None].shape)[:, 0], top)

        (cache, _, _), (toks, lps, routes, top) = jax.lax.scan(
            step, (cache, tokens, positions), None, length=steps
        )
        # (K, B) each; routes (K, B, moe layers, k) of the fed tokens; top: ids, logprobs (K, B, top_n)
        return toks, lps, cache, routes, top

    # -- host-facing API ----------------------------------------------------------------------

    def derive(self, params: Params) -> Derived:
        """Serving-only leaves computed from `params`, made when weights are staged.

        On CPU, a tied embedding gets a transposed (hidden, vocab) copy for the output
        projection (see `QwenForCausalLM.logits`): +vocab x hidden of memory for ~35% off the
        largest matmul of a decode step. Other platforms and untied models derive nothing.
        """
        if self._transpose_head is None:
            return {}
        return {"head_t": self._transpose_head(params["embed_tokens"])}

    def set_params(self, params: Params, derived: Derived | None = None) -> None:
        """Serve `params`; `derived` is `derive(params)` if the caller made it already."""
        self.derived = self.derive(params) if derived is None else derived
        self.params = params

    def prefill(
        self,
        prompts: list[list[int]],
        dst_slots: list[int],
        src_rows: list[int],
        sampling: SlotSampling,
    ) -> tuple[np.ndarray, np.ndarray, jax.Array]:
        """Prefill `prompts` (one row each) into `dst_slots` (slot m gets prompt src_rows[m]).

        `sampling` has max_batch rows aligned with dst_slots. Returns the first sampled token
        and its logprob per destination (max_batch,), on the host, and the experts every
        prompt position used (rows, length bucket, moe layers, k) int16, left on the devices.
        """
        assert self.params is not None, "set_params() before generating"
        b = pow2_at_least(len(prompts))
        p = min(pow2_at_least(max(len(x) for x in prompts), MIN_PREFILL_LEN), self.max_seq_len)
        tokens = np.zeros((b, p), np.int32)
        lengths = np.zeros((b,), np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, : len(ids)] = ids
            lengths[i] = len(ids)
        dst = np.full((self.max_batch,), self.max_batch, np.int32)  # out of range: dropped
        src = np.zeros((self.max_batch,), np.int32)
        dst[: len(dst_slots)] = dst_slots
        src[: len(src_rows)] = src_rows
        toks, lps, self.cache, routes, top = self._prefill(
            self.params, self.derived, self.cache, tokens, lengths, dst, src, sampling
        )
        self.alternatives = alternatives_to_host(top, sampling)
        return np.asarray(toks), np.asarray(lps), routes

    def decode(
        self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray, sampling: SlotSampling
    ) -> tuple[np.ndarray, np.ndarray, jax.Array]:
        """Run `decode_steps` steps (one with a structured-output row: `call_steps`) for the
        given slots only.

        slots, tokens, positions (B,) with B from `decode_batch`; padding rows carry slot id
        max_batch. With B == max_batch, row i must be slot i and idle slots are the padding
        (position max_seq_len): every slot decodes in place, without gathering its keys and
        values (see `forward.decode`). `sampling` has B rows. Returns tokens and logprobs (K, B)
        on the host, and the experts each step's fed token used (K, B, moe layers, k) int16,
        left on the devices.
        """
        assert self.params is not None, "set_params() before generating"
        if len(slots) == self.max_batch and not np.array_equal(slots, np.arange(self.max_batch)):
            raise ValueError(f"a full decode batch must list slots in order 0..{self.max_batch - 1}, got {slots}")
        real = (slots < self.max_batch) & (positions < self.max_seq_len)
        top = int(positions[real].max()) if real.any() else 0
        steps = call_steps(sampling, self.decode_steps)
        kv_len = min(pow2_at_least(top + steps + 1, 64), self.max_seq_len)
        toks, lps, self.cache, routes, top = self._decode(
            self.params,
            self.derived,
            self.cache,
            slots.astype(np.int32),
            tokens.astype(np.int32),
            positions.astype(np.int32),
            sampling,
            kv_len=kv_len,
            steps=steps,
        )
        self.alternatives = alternatives_to_host(top, sampling)
        return np.asarray(toks), np.asarray(lps), routes

    def decode_batch(self, active: int) -> int:
        """Rows a decode call runs for `active` slots: the next power of two, at most max_batch."""
        return min(pow2_at_least(active), self.max_batch)

    def compiled_count(self) -> int:
        """Executables compiled so far by this runner (grows only with new shape buckets)."""
        return compiled_executables(self._prefill) + compiled_executables(self._decode)

    def place(self, path: str, array) -> jax.Array:
        """Copy one host array onto the devices with the engine's sharding (never aliases)."""
        return placement.place(array, self.param_shardings[path])
