"""Paged forwards and runner against the contiguous path and transformers, in float32.

The variants, prompts, bound and transformers references of test_model_numerics (GQA ratios
1, 2 and 4, head_dim != hidden/heads, Qwen2 biases), on 1 and on 4 simulated devices (the pool
sharded by KV heads where they divide, as the contiguous cache). Every prompt has 2 samples
sharing its full pages, each with its own copy of the partial last page, in a fragmented pool
(page ids neither contiguous nor ascending):

- the cached path (paged prefill, then one paged decode step per fed reference token) gives the
  full-sequence logits of our forward and of transformers, for both samples;
- the paged runner's greedy continuation of every sample is transformers' `generate`;
- the Pallas kernel (TPU interpret mode) and the XLA kernel give the same decode logits, up to
  the kernel's bfloat16 K/V;
- the runner's XLA decode call (pages gathered once into a dense block for all its steps) gives
  the tokens, logprobs and page writes of its steps run one by one over the pages.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model_numerics import DEVICE_COUNTS, NEW_TOKENS, PROMPTS, RTOL, VARIANTS, reference, rel_err

from rollout.engine.native.kv.paged import forward
from rollout.engine.native.kv.paged.pool import PagePool
from rollout.engine.native.kv.paged.runner import PagedRunner, plan_prefill
from rollout.engine.native.sampling import SlotSampling, sample
from rollout.engine.staging import load_params
from rollout.models.bind import ModelDef
from rollout.models.config import ModelConfig
from rollout.models.sharding import make_mesh
from rollout.testing import make_tiny_checkpoint

PAGE_SIZE = 4
NUM_PAGES = 96
MAX_SEQ_LEN = 128
SAMPLES = 2
MAX_BATCH = len(PROMPTS) * SAMPLES


def greedy_sampling(sample_indices: list[int], rows: int) -> SlotSampling:
    """Greedy sampler rows for `sample_indices`, padded with greedy rows to `rows`."""
    index = np.zeros(rows, np.int32)
    index[: len(sample_indices)] = sample_indices
    return SlotSampling(
        temperature=jnp.zeros(rows, jnp.float32), top_k=jnp.zeros(rows, jnp.int32),
        top_p=jnp.ones(rows, jnp.float32), seed=jnp.zeros(rows, jnp.int32), sample_index=jnp.asarray(index),
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paged-numerics")
    return {
        name: make_tiny_checkpoint(root / name, architecture, seed=3, **overrides)
        for name, (architecture, overrides) in VARIANTS.items()
    }


def make_runner(path: Path, n_devices: int, **kwargs) -> PagedRunner:
    cfg = ModelConfig.from_pretrained(path)
    model_def = ModelDef.create(cfg, "float32")
    devices = jax.devices()[:n_devices]
    assert len(devices) == n_devices, "conftest must force 4 host devices"
    options = dict(max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, decode_steps=4, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    runner = PagedRunner(model_def, make_mesh(devices), **(options | kwargs))
    params = load_params(path, model_def.spec, runner.place)
    runner.set_params(params)
    return runner


@dataclasses.dataclass
class Case:
    name: str
    path: Path
    runner: PagedRunner

    @functools.cached_property
    def full_logits(self) -> np.ndarray:
        from rollout.models import forward as model_forward

        batch = reference(self.path).batch
        fwd = jax.jit(lambda p, t, m: model_forward.forward_full(self.runner.model_def.bind(p), t, m))
        return np.asarray(fwd(self.runner.params, batch.tokens, batch.mask))


@pytest.fixture(scope="module", params=[(v, n) for v in VARIANTS for n in DEVICE_COUNTS], ids=lambda c: f"{c[0]}-{c[1]}dev")
def case(request, checkpoints):
    name, n_devices = request.param
    return Case(name, checkpoints[name], make_runner(checkpoints[name], n_devices, kernel="xla"))


def fragmented_pool() -> PagePool:
    """A pool whose free list hands out scattered, descending page ids."""
    pool = PagePool(NUM_PAGES, PAGE_SIZE)
    for i in range(40):
        assert pool.admit_group([("filler", i)], PAGE_SIZE)
    for i in range(0, 40, 2):
        pool.free(("filler", i))
    return pool


def admit(pool: PagePool, prompts: list[list[int]]) -> list[list[tuple[int, int]]]:
    groups = [[(r, s) for s in range(SAMPLES)] for r in range(len(prompts))]
    for ids, prompt in zip(groups, prompts):
        assert pool.admit_group(ids, len(prompt))
    pool.check()
    assert pool.stats().shared_pages > 0
    return groups


def teacher_forced_logits(
    runner: PagedRunner, continuations: list[list[int]], kernel: str, steps: int, interpret: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paged prefill of PROMPTS (2 samples each), then `steps` decode steps feeding
    `continuations`: logits (destinations, steps + 1, vocab) in group order, each
    destination's prompt row, and its prompt length."""
    pool = fragmented_pool()
    groups = admit(pool, PROMPTS)
    plan = plan_prefill(
        PROMPTS, [[pool.table(s) for s in g] for g in groups], page_size=PAGE_SIZE, num_pages=NUM_PAGES,
        max_batch=MAX_BATCH, bucket=16,
    )
    bind = runner.model_def.bind
    prefill = jax.jit(lambda p, kv, *a: forward.prefill(bind(p), kv, *a))
    decode = jax.jit(
        lambda p, kv, table, tok, pos: forward.decode(
            bind(p), kv, table, tok, pos, runner.width, kernel=kernel, mesh=runner.mesh, interpret=interpret
        )
    )
    first, kv = prefill(runner.params, runner.pool, plan.tokens, plan.lengths, plan.write_pages, *plan.tails)
    seqs = [s for g in groups for s in g]
    rows = plan.src_rows[: len(seqs)]
    lengths = np.array([len(PROMPTS[r]) for r in rows], np.int32)
    out = [np.asarray(first)[rows]]
    for k in range(steps):
        table = np.full((len(seqs), runner.width), NUM_PAGES, np.int32)
        for i, seq in enumerate(seqs):
            assert pool.grow(seq, int(lengths[i]) + k + 1)
            table[i, : len(pool.table(seq))] = pool.table(seq)
        fed = np.array([continuations[r][k] for r in rows], np.int32)
        logits, kv = decode(runner.params, kv, table, fed, lengths + k)
        out.append(np.asarray(logits))
    pool.check()
    return np.stack(out, axis=1), rows, lengths


def test_paged_cached_logits_match_the_full_forward_and_transformers(case):
    ref = reference(case.path)
    cached, rows, lengths = teacher_forced_logits(case.runner, ref.continuations, "xla", NEW_TOKENS - 1)
    index = np.array([[ref.batch.offsets[r] + lengths[i] - 1 + k for k in range(NEW_TOKENS)] for i, r in enumerate(rows)])
    ours_full = case.full_logits[rows[:, None], index]
    hf_full = ref.logits[rows[:, None], index]
    err_ours, err_hf = rel_err(cached, ours_full), rel_err(cached, hf_full)
    devices = len(case.runner.mesh.devices.flat)
    print(f"\n{case.name} {devices}dev paged cached vs full rel err {err_ours:.2e} (vs transformers {err_hf:.2e})")
    assert err_ours <= RTOL, f"paged cached vs our full forward: {err_ours:.2e} > {RTOL}"
    assert err_hf <= RTOL, f"paged cached vs transformers' full forward: {err_hf:.2e} > {RTOL}"


def greedy(runner: PagedRunner, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """SAMPLES greedy continuations per prompt through the runner, pages from a PagePool."""
    pool = fragmented_pool()
    groups = admit(pool, prompts)
    seqs = [s for g in groups for s in g]
    index = [s for (_, s) in seqs]
    first, _, _ = runner.prefill(prompts, [[pool.table(s) for s in g] for g in groups], greedy_sampling(index, runner.max_batch))
    out = {seq: [int(first[m])] for m, seq in enumerate(seqs)}
    pos = {seq: len(prompts[seq[0]]) for seq in seqs}
    while min(len(t) for t in out.values()) < new_tokens:
        for seq in seqs:
            assert pool.grow(seq, pos[seq] + runner.decode_steps)
        toks, _, _ = runner.decode(
            [pool.table(s) for s in seqs],
            np.array([out[s][-1] for s in seqs], np.int32),
            np.array([pos[s] for s in seqs], np.int32),
            greedy_sampling(index, runner.decode_batch(len(seqs))),
        )
        for i, seq in enumerate(seqs):
            out[seq] += [int(t) for t in toks[:, i]]
            pos[seq] += runner.decode_steps
    for seq in seqs:
        pool.free(seq)
    pool.check()
    return [out[s][:new_tokens] for s in seqs]


def test_paged_runner_greedy_continuations_equal_transformers_generate(case):
    got = greedy(case.runner, PROMPTS, NEW_TOKENS)
    want = [c for c in reference(case.path).continuations for _ in range(SAMPLES)]
    assert got == want


@pytest.mark.parametrize("n_devices", DEVICE_COUNTS)
def test_pallas_decode_in_interpret_mode_gives_the_xla_logits(checkpoints, n_devices):
    """Both kernels in the model's decode; the Pallas kernel reads K/V in bfloat16, hence the
    looser bound (2.4e-3 measured on 1 and 4 devices)."""
    name = "qwen3-tied-gqa4"
    runner = make_runner(checkpoints[name], n_devices, kernel="xla")
    continuations = reference(checkpoints[name]).continuations
    xla, _, _ = teacher_forced_logits(runner, continuations, "xla", steps=2)
    pallas, _, _ = teacher_forced_logits(runner, continuations, "pallas", steps=2, interpret=True)
    err = rel_err(pallas, xla)
    print(f"\n{name} {n_devices}dev pallas (interpret) vs xla decode rel err {err:.2e}")
    assert err <= 2e-2


def test_a_weight_swap_reuses_the_compiled_paged_functions(tiny_qwen3, tiny_qwen3_perturbed):
    runner = make_runner(tiny_qwen3, 1)
    before = greedy(runner, PROMPTS, 8)
    compiled = runner.compiled_count()
    other = make_runner(tiny_qwen3_perturbed, 1)
    runner.set_params(other.params, other.derived)
    after = greedy(runner, PROMPTS, 8)
    assert runner.compiled_count() == compiled
    assert after != before


def test_decode_steps_past_a_rows_pages_and_padding_rows_write_nowhere(tiny_qwen3):
    """A sequence holding one page decodes 4 steps from its page's last position: the 3 steps
    past its page, and the padding row, leave every other page as it was."""
    runner = make_runner(tiny_qwen3, 1, max_batch=2)
    pool = PagePool(NUM_PAGES, PAGE_SIZE)
    assert pool.admit_group(["s"], 3)
    sampling = greedy_sampling([0], 2)
    runner.prefill([[5, 6, 7]], [[pool.table("s")]], sampling)
    before = [np.asarray(x).copy() for layer in runner.pool for x in layer]
    runner.decode([pool.table("s"), None], np.array([9, 0]), np.array([3, 0]), sampling)
    after = [np.asarray(x) for layer in runner.pool for x in layer]
    own = pool.table("s")[0]
    for b, a in zip(before, after):
        assert np.array_equal(np.delete(b, own, axis=1), np.delete(a, own, axis=1))
        assert not np.array_equal(b[:, own], a[:, own])  # position 3 was written


@pytest.mark.parametrize("n_devices", DEVICE_COUNTS)
def test_a_decode_call_on_one_gathered_block_equals_its_steps_over_the_pages(checkpoints, n_devices):
    """The XLA path gathers each row's pages once per call and runs the call's steps on that
    dense block: its tokens, logprobs and the pages it writes are those of the same steps run
    one at a time over the pages (`forward.decode`), rows at different positions, padded."""
    runner = make_runner(checkpoints["qwen3-tied-gqa4"], n_devices, block_budget_bytes=1 << 30)  # holds the block
    check_decode_call_equals_its_steps(runner, gathers_once=True)


def test_a_decode_call_whose_block_exceeds_the_budget_gathers_per_step_with_the_same_result(checkpoints):
    """Above `block_budget_bytes` (default: the pool's bytes) the XLA path does not build the
    dense block (it could outgrow the pool); it runs the steps over the pages, same results."""
    check_decode_call_equals_its_steps(
        make_runner(checkpoints["qwen3-tied-gqa4"], 1, block_budget_bytes=0), gathers_once=False
    )


def test_the_gathered_block_never_outgrows_the_pool_by_default(checkpoints):
    runner = make_runner(checkpoints["qwen3-tied-gqa4"], 1)
    pool_bytes = sum(k.nbytes + v.nbytes for k, v in runner.pool)
    assert runner.block_budget_bytes == pool_bytes
    assert runner.gathers_once(1, runner.num_pages)
    assert not runner.gathers_once(2, runner.num_pages)
    assert runner.block_bytes(2, runner.num_pages) == 2 * pool_bytes


def check_decode_call_equals_its_steps(runner, *, gathers_once: bool) -> None:
    assert runner.kernel == "xla"
    pool = fragmented_pool()
    groups = admit(pool, PROMPTS)
    seqs = [s for g in groups for s in g][:-1]  # one padding row
    first, _, _ = runner.prefill(PROMPTS, [[pool.table(s) for s in g] for g in groups], greedy_sampling([], MAX_BATCH))
    positions = np.array([len(PROMPTS[r]) for r, _ in seqs], np.int32)
    for seq, pos in zip(seqs, positions):
        assert pool.grow(seq, int(pos) + runner.decode_steps)
    tables = [pool.table(s) for s in seqs]
    tokens = np.asarray(first)[: len(seqs)].astype(np.int32)
    table, tok, pos, span = runner.decode_inputs(tables, tokens, positions)
    assert runner.gathers_once(len(tok), span) is gathers_once
    sampling = greedy_sampling([], len(tok))
    start = jax.device_get(runner.pool)

    bind = runner.model_def.bind
    step = jax.jit(lambda p, kv, tok, pos: forward.decode(bind(p), kv, table, tok, pos, span, kernel="xla", mesh=runner.mesh))
    kv = jax.device_put(start, runner.pool_sharding)
    want_tokens, want_logprobs = [], []
    for _ in range(runner.decode_steps):
        logits, kv = step(runner.params, kv, tok, pos)
        tok, lp = jax.device_get(sample(logits, sampling, pos + 1))
        want_tokens.append(tok)
        want_logprobs.append(lp)
        pos = pos + 1

    got_tokens, got_logprobs, _ = runner.decode(tables, tokens, positions, sampling)
    rows = len(seqs)
    assert np.array_equal(got_tokens[:, :rows], np.stack(want_tokens)[:, :rows])
    np.testing.assert_allclose(got_logprobs[:, :rows], np.stack(want_logprobs)[:, :rows], rtol=1e-5, atol=1e-5)
    for (gk, gv), (wk, wv), (sk, _) in zip(jax.device_get(runner.pool), jax.device_get(kv), start):
        written = np.any(wk != sk, axis=(0, 2, 3))  # pages the steps wrote
        assert written.any()
        assert np.array_equal(np.any(gk != sk, axis=(0, 2, 3)), written)
        np.testing.assert_allclose(gk, wk, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gv, wv, rtol=1e-5, atol=1e-6)
