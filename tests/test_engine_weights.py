"""Engine weight sync: stage/commit/abort as a state machine, swap policies, no recompiles,
bounded memory."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rollout.engine import EngineConfig, SamplingParams, WeightSyncError
from rollout.engine.backend import EngineBackend
from rollout.engine.native.engine import Engine
from rollout.weights.finite import NonFiniteWeightsError
from rollout.weights.loader import iter_tensors
from rollout.weights.spec import SpecMismatchError

from hf_reference import hf_greedy

PROMPT = [7, 8, 9, 10]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def hf_flat(path) -> dict[str, np.ndarray]:
    return dict(iter_tensors(path))


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(max_batch=4, max_seq_len=256, decode_steps=4)) as eng:
        yield eng


def _sync(engine: Engine, params, policy: str | None = None) -> int:
    version = engine.version + 1
    engine.stage(version, params)
    engine.commit(version, policy, wait=True)
    return version


def test_the_native_engine_provides_the_backend_interface_the_worker_uses(engine):
    assert isinstance(engine, EngineBackend)


def test_committed_perturbed_weights_match_transformers_on_those_weights(engine, tiny_qwen3_perturbed):
    version = _sync(engine, hf_flat(tiny_qwen3_perturbed))
    out = engine.generate([PROMPT], GREEDY)[0]
    assert out.weight_version == version
    assert list(out.token_ids) == hf_greedy(tiny_qwen3_perturbed, PROMPT, 32)


def test_every_leaf_takes_effect(engine, tiny_qwen3, tiny_qwen3_perturbed):
    """Swapping in the perturbed value of one leaf at a time changes the logits every time."""
    import jax

    from rollout.models import forward

    _sync(engine, hf_flat(tiny_qwen3))
    base = engine.current_params()
    full_logits_fn = jax.jit(lambda p, t, m: forward.forward_full(engine.model_def.bind(p), t, m))
    seq = np.array([PROMPT])
    ref = np.asarray(full_logits_fn(base, seq, np.ones_like(seq)))
    other = engine.model_def.spec  # same paths in both checkpoints
    from rollout.weights.spec import flatten_params

    perturbed = flatten_params(hf_flat(tiny_qwen3_perturbed), engine.spec)
    for path in other.paths:
        params = dict(base)
        params[path] = jax.device_put(np.asarray(perturbed[path]), engine.param_shardings[path])
        out = np.asarray(full_logits_fn(params, seq, np.ones_like(seq)))
        assert not np.allclose(out, ref), f"{path} had no effect on the logits"


def _bad_updates(flat: dict[str, np.ndarray]) -> dict[str, tuple[dict, type]]:
    name = "model.layers.0.self_attn.q_proj.weight"
    missing = {k: v for k, v in flat.items() if k != name}
    extra = {**flat, "model.layers.9.mlp.up_proj.weight": flat["model.layers.0.mlp.up_proj.weight"]}
    shape = {**flat, name: flat[name][:, :-1]}
    ints = {**flat, name: flat[name].astype(np.int32)}
    nan = {**flat, name: np.where(np.arange(flat[name].size).reshape(flat[name].shape) == 5, np.nan, flat[name])}
    inf = {**flat, "model.norm.weight": np.full_like(flat["model.norm.weight"], np.inf)}
    return {
        "missing leaf": (missing, SpecMismatchError),
        "extra leaf": (extra, SpecMismatchError),
        "wrong shape": (shape, SpecMismatchError),
        "integer dtype": (ints, SpecMismatchError),
        "nan": (nan, NonFiniteWeightsError),
        "inf": (inf, NonFiniteWeightsError),
        "not a tree": ([1, 2, 3], TypeError),
    }


@pytest.mark.parametrize("case", ["missing leaf", "extra leaf", "wrong shape", "integer dtype", "nan", "inf", "not a tree"])
def test_rejected_stage_leaves_outputs_bit_identical_and_version_unchanged(engine, tiny_qwen3_perturbed, case):
    before = engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    version = engine.version
    params, error = _bad_updates(hf_flat(tiny_qwen3_perturbed))[case]
    with pytest.raises(error):
        engine.stage(version + 1, params)
    assert engine.staged_version is None
    with pytest.raises(WeightSyncError, match="not staged"):
        engine.commit(version + 1)
    after = engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert engine.version == version and after.weight_version == version
    assert after.token_ids == before.token_ids and after.logprobs == before.logprobs


def test_spec_mismatch_message_lists_missing_extra_and_shapes(engine, tiny_qwen3_perturbed):
    flat = hf_flat(tiny_qwen3_perturbed)
    flat.pop("model.norm.weight")
    flat["model.layers.0.mlp.up_proj.weight"] = flat["model.layers.0.mlp.up_proj.weight"][:-2]
    flat["model.layers.7.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(SpecMismatchError) as info:
        engine.stage(engine.version + 1, flat)
    text = str(info.value)
    assert "missing 1 path(s): norm.weight" in text
    assert "extra 1 path(s): layers.7.mlp.up_proj.kernel" in text
    assert "layers.0.mlp.up_proj.kernel: expected shape (64, 128), got (64, 126)" in text


def test_versions_only_go_forward(engine, tiny_qwen3):
    with pytest.raises(WeightSyncError, match="only go forward"):
        engine.stage(engine.version, hf_flat(tiny_qwen3))
    with pytest.raises(WeightSyncError, match="not staged"):
        engine.commit(engine.version + 5)


def test_an_older_stage_does_not_replace_a_newer_staged_copy(engine, tiny_qwen3, tiny_qwen3_perturbed):
    newer = engine.version + 2
    engine.stage(newer, hf_flat(tiny_qwen3_perturbed))
    try:
        with pytest.raises(WeightSyncError, match=f"version {newer} is already staged"):
            engine.stage(newer - 1, hf_flat(tiny_qwen3))
        assert engine.staged_version == newer
        engine.stage(newer, hf_flat(tiny_qwen3_perturbed))  # the same version again: a retry, accepted
        assert engine.staged_version == newer
    finally:
        engine.abort(newer)


@pytest.mark.parametrize("source", ["tree", "checkpoint"])
def test_a_stage_overtaken_by_a_commit_meanwhile_is_refused(engine, tiny_qwen3, source, monkeypatch):
    """Both sources share one staging path: a commit of a newer version that lands while the
    copy is being placed (here: from inside the derive step) wins, and the stale copy is dropped."""
    version = engine.version
    derive = engine.runner.derive

    def commit_newer_first(params):
        monkeypatch.setattr(engine.runner, "derive", derive)  # the nested stage derives normally
        engine.stage(version + 2, hf_flat(tiny_qwen3))
        engine.commit(version + 2, wait=True)
        return derive(params)

    monkeypatch.setattr(engine.runner, "derive", commit_newer_first)
    with pytest.raises(WeightSyncError, match="overtaken by the commit of version"):
        if source == "tree":
            engine.stage(version + 1, hf_flat(tiny_qwen3))
        else:
            engine.stage_checkpoint(version + 1, tiny_qwen3)
    assert engine.version == version + 2 and engine.staged_version is None


def test_abort_drops_the_staged_copy(engine, tiny_qwen3_perturbed):
    version = engine.version
    engine.stage(version + 1, hf_flat(tiny_qwen3_perturbed))
    assert engine.staged_version == version + 1
    assert engine.abort(version + 1)
    assert engine.staged_version is None and engine.version == version
    with pytest.raises(WeightSyncError):
        engine.commit(version + 1)


def test_bfloat16_update_is_cast_to_the_engine_dtype(engine, tiny_qwen3_perturbed):
    import ml_dtypes

    flat = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_flat(tiny_qwen3_perturbed).items()}
    version = _sync(engine, flat)
    assert engine.version == version
    assert all(str(a.dtype) == "float32" for a in engine.current_params().values())


def _commit_during_generation(engine: Engine, old_params, new_params, policy: str):
    """Serve `old_params` as version `old`, start a long greedy generation, and commit
    `new_params` as `old + 1` under `policy` once it has produced some tokens.
    Returns (old, the running generation's future)."""
    old = _sync(engine, old_params)
    engine.stage(old + 1, new_params)
    sp = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    start = engine.tokens_generated
    running = engine.submit(PROMPT, sp)
    deadline = time.monotonic() + 60
    while engine.tokens_generated - start < 8:
        assert time.monotonic() < deadline and not running.done(), "generation ended before the swap"
        time.sleep(0.001)
    engine.commit(old + 1, policy)
    return old, running


def test_drain_policy_finishes_running_sequences_on_the_old_version(engine, tiny_qwen3, tiny_qwen3_perturbed):
    old, running = _commit_during_generation(engine, hf_flat(tiny_qwen3), hf_flat(tiny_qwen3_perturbed), "drain")
    newcomer = engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0.0))
    done = running.result(60)[0]
    assert set(done.token_versions) == {old} and done.weight_version == old
    assert newcomer.result(60)[0].weight_version == old + 1


def test_continue_policy_keeps_kv_and_tags_tokens_with_their_version(engine, tiny_qwen3, tiny_qwen3_perturbed):
    old, running = _commit_during_generation(engine, hf_flat(tiny_qwen3), hf_flat(tiny_qwen3_perturbed), "continue")
    done = running.result(60)[0]
    k = done.token_versions.index(old + 1)
    assert 0 < k < len(done.token_ids)
    assert done.token_versions == (old,) * k + (old + 1,) * (len(done.token_ids) - k)
    assert done.weight_version == old + 1 and done.mixed_versions


def test_recompute_policy_continues_like_a_fresh_request_on_the_new_weights(engine, tiny_qwen3, tiny_qwen3_perturbed):
    old, running = _commit_during_generation(engine, hf_flat(tiny_qwen3), hf_flat(tiny_qwen3_perturbed), "recompute")
    done = running.result(60)[0]
    k = done.token_versions.index(old + 1)
    assert 0 < k < len(done.token_ids)
    fresh = engine.generate(
        [PROMPT + list(done.token_ids[:k])],
        SamplingParams(max_tokens=len(done.token_ids) - k, temperature=0.0, ignore_eos=True),
    )[0]
    assert fresh.token_ids == done.token_ids[k:]


def test_swap_compiles_nothing(engine, tiny_qwen3, tiny_qwen3_perturbed):
    """generate -> sync -> generate reuses every executable (a compile counter proves it)."""
    import jax

    compiles: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    prompts = [PROMPT, [1, 2, 3]]
    sp = SamplingParams(max_tokens=20, temperature=0.7, seed=1, n=2)
    _sync(engine, hf_flat(tiny_qwen3))
    engine.generate(prompts, sp)  # one warm-up compiles every shape bucket this test uses
    executables = engine.status()["compiled"]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for flat in (hf_flat(tiny_qwen3), hf_flat(tiny_qwen3_perturbed)):
            engine.generate(prompts, sp)
            _sync(engine, flat)
            engine.generate(prompts, sp)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert engine.status()["compiled"] == executables


def test_fifty_stage_commit_cycles_keep_at_most_one_staged_copy(tmp_path):
    """RSS and live device buffers stay flat across 50 cycles (a leaked copy would show)."""
    import gc

    import jax
    import psutil

    from rollout.testing import make_tiny_checkpoint

    # ~4M params = 16 MB per copy: 50 leaked copies would be 800 MB.
    ckpt = make_tiny_checkpoint(tmp_path / "mid", seed=3, vocab_size=8192, hidden_size=256, intermediate_size=512)
    flat = hf_flat(ckpt)
    with Engine(ckpt, EngineConfig(max_batch=2, max_seq_len=64)) as eng:
        copy_bytes = eng.spec.nbytes
        proc = psutil.Process()

        def cycle(v: int) -> None:
            eng.stage(v, flat)
            eng.commit(v, wait=True)
            eng.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0))

        def settled() -> tuple[int, int]:
            # generate returns when its future resolves, inside the scheduler's last decode
            # pass, which still holds that pass's sampler rows (device arrays) for a moment:
            # counted then, they read as one to five extra buffers. Count once it is idle.
            eng.wait_idle(timeout=60)
            gc.collect()
            return proc.memory_info().rss, len(jax.live_arrays())

        for v in range(1, 6):  # warm-up: allocator pools, compiled kernels
            cycle(v)
        rss0, buffers0 = settled()
        for v in range(6, 56):
            cycle(v)
        rss1, buffers1 = settled()
    assert buffers1 <= buffers0, f"live device buffers grew from {buffers0} to {buffers1}"
    assert rss1 - rss0 < copy_bytes + 32 * 2**20, (
        f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB over 50 cycles; one copy is {copy_bytes / 2**20:.1f} MiB"
    )


def test_non_finite_values_are_counted_across_chunk_boundaries():
    import ml_dtypes

    from rollout.weights.finite import _FINITE_CHUNK, count_non_finite

    values = np.zeros(3 * _FINITE_CHUNK + 6, np.float32)
    values[[0, _FINITE_CHUNK - 1, _FINITE_CHUNK, 3 * _FINITE_CHUNK + 5]] = [np.nan, np.inf, -np.inf, np.nan]
    assert count_non_finite(values) == 4
    assert count_non_finite(values.reshape(-1, 6).astype(ml_dtypes.bfloat16)) == 4
    assert count_non_finite(values.astype(np.float16)) == 4
    assert count_non_finite(np.array([65504, -65504, 1e-8], np.float16)) == 0  # largest and subnormal
    assert count_non_finite(np.array([3.38e38, -3.38e38, 1e-40], ml_dtypes.bfloat16)) == 0
    assert count_non_finite(np.ones((7, 3), np.float32)) == 0


def test_finite_checked_still_checks_a_leaf_that_must_be_cast(engine, tiny_qwen3_perturbed):
    # float64 1e300 overflows to Inf in the engine's float32: the caller's promise was about
    # the values it sent, not about the cast
    flat = hf_flat(tiny_qwen3_perturbed)
    name = "model.norm.weight"
    flat[name] = np.full(flat[name].shape, 1e300, np.float64)
    with pytest.raises(NonFiniteWeightsError, match=r"norm\.weight"):
        engine.stage(engine.version + 1, flat, finite_checked=True)
    assert engine.staged_version is None


def test_staged_weights_do_not_alias_the_aligned_buckets_they_came_from(engine, tiny_qwen3_perturbed):
    # object-store buckets start on 64-byte boundaries, where jax's CPU client would adopt them
    from rollout.engine.placement import owned_copy
    from rollout.weights.buckets import pack, plan_buckets, unpack
    from rollout.weights.spec import flatten_params

    flat = flatten_params(hf_flat(tiny_qwen3_perturbed), engine.spec)
    layout = plan_buckets(engine.spec, bucket_bytes=1 << 20)
    buffers = [owned_copy(np.empty(n, np.uint8)) for n in layout.bucket_nbytes]
    packed = pack(flat, layout, version=1, buffers=buffers)
    staged = engine.stage(engine.version + 1, unpack(packed.manifest, packed.buffers))
    try:
        expected = {path: np.asarray(array).copy() for path, array in staged.params.items()}
        for buffer in packed.buffers:
            buffer[:] = 0
        for path, array in staged.params.items():
            np.testing.assert_array_equal(np.asarray(array), expected[path], err_msg=path)
    finally:
        engine.abort()
