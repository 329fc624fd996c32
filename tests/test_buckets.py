"""Buckets and the msgpack manifest: layout, round trips, casts, checksums, untrusted input."""

from __future__ import annotations

import itertools
import pickle
import zlib

import ml_dtypes
import msgpack
import numpy as np
import pytest

from rollout.weights.buckets import (
    ALIGN,
    CHECKSUMS,
    WINDOW,
    BucketChecksumError,
    Manifest,
    ManifestError,
    checksum,
    pack,
    plan_buckets,
    unpack,
    verify,
)
from rollout.weights.finite import NonFiniteWeightsError
from rollout.weights.spec import spec_of_leaves

SPEC = spec_of_leaves(
    [
        ("embed_tokens", (64, 16), "float32"),
        ("layers.0.self_attn.q_proj.kernel", (16, 32), "float32"),
        ("layers.0.input_layernorm.weight", (16,), "float32"),
        ("layers.0.mlp.up_proj.kernel", (16, 48), "bfloat16"),
        ("scale", (), "float32"),
        ("empty", (0, 4), "float32"),
        ("norm.weight", (3,), "float32"),
    ]
)


def random_flat(spec, seed=0):
    rng = np.random.default_rng(seed)
    return {leaf.path: rng.standard_normal(leaf.shape).astype(np.float32) for leaf in spec.leaves}


def test_buckets_never_exceed_bucket_bytes_except_for_a_single_large_leaf():
    layout = plan_buckets(SPEC, bucket_bytes=2048)
    for index, size in enumerate(layout.bucket_nbytes):
        leaves = layout.leaves_of(index)
        assert size <= 2048 or len(leaves) == 1, (index, size, leaves)
    big = next(s for s in layout.slots if s.path == "embed_tokens")  # 4096 bytes > 2048
    assert layout.leaves_of(big.bucket) == [big]


def test_leaves_keep_spec_order_and_aligned_offsets():
    layout = plan_buckets(SPEC, bucket_bytes=1 << 20)
    assert [s.path for s in layout.slots] == list(SPEC.paths)
    assert len(layout.bucket_nbytes) == 1
    assert all(s.offset % ALIGN == 0 for s in layout.slots)
    ends = [(s.offset, s.offset + s.nbytes) for s in layout.slots]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends)), "leaves overlap"


def test_pack_then_unpack_round_trips_every_leaf_exactly():
    flat = random_flat(SPEC)
    layout = plan_buckets(SPEC, bucket_bytes=1024)
    packed = pack(flat, layout, version=3)
    assert all(b.dtype == np.uint8 and b.ndim == 1 and b.flags.c_contiguous for b in packed.buffers)
    out = unpack(packed.manifest, packed.buffers)
    assert list(out) == list(SPEC.paths)
    for leaf in SPEC.leaves:
        assert out[leaf.path].shape == leaf.shape
        assert out[leaf.path].dtype.name == leaf.dtype
        want = flat[leaf.path].astype(ml_dtypes.bfloat16) if leaf.dtype == "bfloat16" else flat[leaf.path]
        np.testing.assert_array_equal(out[leaf.path], want)


def test_unpacked_leaves_are_views_into_the_buckets_not_copies():
    packed = pack(random_flat(SPEC), plan_buckets(SPEC, 1 << 20), version=1)
    out = unpack(packed.manifest, packed.buffers)
    assert np.shares_memory(out["layers.0.self_attn.q_proj.kernel"], packed.buffers[0])


def test_strided_sources_such_as_transposed_hf_weights_pack_correctly():
    spec = spec_of_leaves([("k", (300, 40), "float32")])
    hf = np.random.default_rng(1).standard_normal((40, 300)).astype(np.float32)
    packed = pack({"k": hf.T}, plan_buckets(spec, 1 << 20), version=1)
    np.testing.assert_array_equal(unpack(packed.manifest, packed.buffers)["k"], hf.T)


def test_crc32_checksums_are_zlibs_crc32_of_each_whole_bucket():
    packed = pack(random_flat(SPEC), plan_buckets(SPEC, 1024), version=1, checksum_algo="crc32")
    assert packed.manifest.checksums == tuple(zlib.crc32(b) for b in packed.buffers)
    assert Manifest.from_bytes(packed.manifest.to_bytes()).checksum == "crc32"


@pytest.mark.parametrize("algo", CHECKSUMS)
def test_checksums_catch_a_flipped_bit_a_moved_block_a_truncation_and_another_object(algo):
    data = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8)  # 3 pack windows
    base = checksum(data, algo)
    flipped = data.copy()
    flipped[1_234_567] ^= 0x10
    swapped = data.copy()
    block = 512 << 10
    swapped[:block], swapped[block : 2 * block] = data[block : 2 * block], data[:block]
    other = np.random.default_rng(1).integers(0, 256, data.size, dtype=np.uint8)
    for changed in (flipped, swapped, data[:-1], other, np.zeros_like(data)):
        assert checksum(changed, algo) != base
    assert checksum(data.copy(), algo) == base


def test_reused_buffers_are_overwritten_and_give_the_same_checksums():
    layout = plan_buckets(SPEC, 1024)
    first = pack(random_flat(SPEC, seed=0), layout, version=1)
    again = pack(random_flat(SPEC, seed=1), layout, version=2, buffers=first.buffers)
    fresh = pack(random_flat(SPEC, seed=1), layout, version=2)
    assert again.manifest.checksums == fresh.manifest.checksums


def test_manifest_round_trips_through_msgpack_bytes():
    packed = pack(random_flat(SPEC), plan_buckets(SPEC, 1024), version=7)
    data = packed.manifest.to_bytes()
    assert isinstance(data, bytes)
    back = Manifest.from_bytes(data)
    assert back == packed.manifest
    assert back.spec == SPEC
    raw = msgpack.unpackb(data)
    assert raw["version"] == 7 and raw["paths"] == list(SPEC.paths) and raw["checksum"] == "xxh3_64"


@pytest.mark.parametrize("algo", CHECKSUMS)
def test_checksums_catch_words_reordered_inside_a_window(algo):
    """Format 1's word sum could not: swapping two 8-byte words kept every block's sum."""
    data = np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8)
    reordered = data.copy()
    words = reordered.view(np.uint64)
    words[[10, 11]] = words[[11, 10]]
    assert not np.array_equal(reordered, data) and reordered.view(np.uint64).sum() == data.view(np.uint64).sum()
    assert checksum(reordered, algo) != checksum(data, algo)


def test_the_packers_windowed_checksum_is_the_checksum_of_the_packed_bytes():
    """The packer hashes each window as it packs it; a reader hashing the whole bucket agrees."""
    packed = pack(random_flat(SPEC), plan_buckets(SPEC, 1024), version=1)
    assert packed.manifest.checksums == tuple(checksum(b) for b in packed.buffers)


def test_a_manifest_of_another_format_version_is_refused_naming_both_versions():
    raw = msgpack.unpackb(pack(random_flat(SPEC), plan_buckets(SPEC, 1024), version=1).manifest.to_bytes())
    raw["format"], raw["checksum"] = "rollout.buckets/1", "sum64"
    with pytest.raises(ManifestError, match=r"rollout\.buckets/2.*rollout\.buckets/1.*same one on every node"):
        Manifest.from_bytes(msgpack.packb(raw))


@pytest.mark.parametrize("algo", CHECKSUMS)
def test_a_corrupted_bucket_is_refused_naming_the_bucket(algo):
    packed = pack(random_flat(SPEC), plan_buckets(SPEC, 1024), version=2, checksum_algo=algo)
    bad = [b.copy() for b in packed.buffers]
    bad[1][5] ^= 0xFF
    with pytest.raises(BucketChecksumError, match="bucket 1 of version 2"):
        verify(packed.manifest, bad)
    with pytest.raises(BucketChecksumError, match="expected"):
        verify(packed.manifest, packed.buffers[:-1])
    verify(packed.manifest, packed.buffers)  # the intact ones pass


def test_pickle_or_garbage_is_not_a_manifest():
    packed = pack(random_flat(SPEC), plan_buckets(SPEC, 1024), version=1)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(pickle.dumps(packed.manifest))
    with pytest.raises(ManifestError, match="format"):
        Manifest.from_bytes(msgpack.packb({"format": "something-else"}))


def test_a_manifest_whose_slots_overflow_their_bucket_is_refused():
    raw = msgpack.unpackb(pack(random_flat(SPEC), plan_buckets(SPEC, 1 << 20), version=1).manifest.to_bytes())
    raw["slots"][0][2] += 4  # claims more bytes than its shape holds
    with pytest.raises(ManifestError, match="embed_tokens"):
        Manifest.from_bytes(msgpack.packb(raw))
    raw = msgpack.unpackb(pack(random_flat(SPEC), plan_buckets(SPEC, 1 << 20), version=1).manifest.to_bytes())
    raw["slots"][-1][1] = raw["buckets"][0]  # starts at the end of its bucket
    with pytest.raises(ManifestError, match="overflow"):
        Manifest.from_bytes(msgpack.packb(raw))


def test_a_leaf_of_the_wrong_shape_is_refused_while_packing():
    flat = random_flat(SPEC)
    flat["norm.weight"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"norm.weight: expected shape \(3,\)"):
        pack(flat, plan_buckets(SPEC, 1024), version=1)


def test_bucket_bytes_below_the_alignment_is_refused():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(SPEC, bucket_bytes=8)


# -- the inbox: buckets that arrive while the engine already reads the tree ---------------------


def test_an_inbox_tree_has_shapes_at_once_and_data_when_its_bucket_arrives():
    import threading

    from rollout.weights.inbox import BucketInbox

    flat = random_flat(SPEC)
    packed = pack(flat, plan_buckets(SPEC, 1024), version=4)
    inbox = BucketInbox(packed.manifest, timeout_s=10)
    tree = inbox.tree()
    assert {p: (leaf.shape, leaf.dtype.name) for p, leaf in tree.items()} == {
        leaf.path: (leaf.shape, leaf.dtype) for leaf in SPEC.leaves
    }
    last = SPEC.leaves[-1].path
    got = {}
    reader = threading.Thread(target=lambda: got.update(value=np.asarray(tree[last])))
    reader.start()
    reader.join(timeout=0.2)
    assert reader.is_alive(), "the read must wait for its bucket"
    for index, buffer in enumerate(packed.buffers):
        inbox.deliver(index, buffer)
    reader.join(timeout=5)
    np.testing.assert_array_equal(got["value"], flat[last])


def test_a_failed_inbox_makes_pending_reads_raise_and_a_silent_one_times_out():
    from rollout.weights.inbox import BucketInbox

    packed = pack(random_flat(SPEC), plan_buckets(SPEC, 1024), version=4)
    inbox = BucketInbox(packed.manifest, timeout_s=0.1)
    with pytest.raises(TimeoutError, match=r"did not arrive within 0\.1s"):
        np.asarray(inbox.tree()["norm.weight"])
    inbox.fail(BucketChecksumError("bucket 2 is bad"))
    with pytest.raises(BucketChecksumError, match="bucket 2 is bad"):
        np.asarray(inbox.tree()["embed_tokens"])


# leaves that straddle pack windows: ~11 MiB in one bucket, 3 windows
WIDE_SPEC = spec_of_leaves(
    [
        ("a", (3 * WINDOW // 16 + 3,), "float32"),
        ("b", (WINDOW // 4 + 5, 2), "bfloat16"),
        ("c", (1000, 700), "float32"),
        ("d", (WINDOW // 4 + 1,), "float32"),
        ("e", (7,), "float32"),
    ]
)


def _wide_flat(seed=0):
    flat = random_flat(WIDE_SPEC, seed)
    flat["c"] = np.ascontiguousarray(flat["c"].T).T  # strided: a transposed view
    return flat


@pytest.mark.parametrize("algo", CHECKSUMS)
def test_a_bucket_wider_than_a_pack_window_gets_the_checksum_of_its_whole_bytes(algo):
    flat = _wide_flat()
    layout = plan_buckets(WIDE_SPEC, bucket_bytes=64 << 20)
    assert layout.bucket_nbytes[0] > 2 * WINDOW and len(layout.bucket_nbytes) == 1
    packed = pack(flat, layout, version=1, checksum_algo=algo)
    assert packed.manifest.checksums[0] == checksum(packed.buffers[0], algo)
    for path, leaf in unpack(packed.manifest, packed.buffers).items():
        np.testing.assert_array_equal(leaf, flat[path].astype(leaf.dtype), err_msg=path)


def test_packing_refuses_nan_or_inf_naming_the_first_leaf_and_its_count_across_windows():
    flat = _wide_flat()
    flat["a"][[0, -1]] = np.nan  # the first and the second window
    flat["d"][5] = np.inf
    layout = plan_buckets(WIDE_SPEC, bucket_bytes=64 << 20)
    with pytest.raises(NonFiniteWeightsError, match=r"^a: 2 non-finite value\(s\)"):
        pack(flat, layout, version=1)
    flat["a"][[0, -1]] = 0.0
    with pytest.raises(NonFiniteWeightsError, match=r"^d: 1 non-finite"):
        pack(flat, layout, version=1)


def test_a_cast_that_overflows_to_inf_is_refused_while_packing():
    flat = random_flat(SPEC)
    flat["layers.0.mlp.up_proj.kernel"][0, 0] = np.finfo(np.float32).max  # Inf in bfloat16
    with pytest.raises(NonFiniteWeightsError, match="up_proj"):
        pack(flat, plan_buckets(SPEC, bucket_bytes=1 << 20), version=1)


def test_a_packed_manifest_says_its_values_were_counted_finite_and_a_hand_made_one_does_not():
    packed = pack(random_flat(SPEC), plan_buckets(SPEC, bucket_bytes=1 << 20), version=1)
    assert Manifest.from_bytes(packed.manifest.to_bytes()).finite is True
    hand_made = Manifest(1, packed.manifest.layout, packed.manifest.checksums)
    assert Manifest.from_bytes(hand_made.to_bytes()).finite is False
