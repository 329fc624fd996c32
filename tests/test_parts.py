"""Buckets as parts (a list of each leaf's bytes, what a sync puts): the packed form's checksum,
no copy of a leaf that is already in the slot's dtype and order, refusals, and the readers."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest

from rollout.weights.buckets import (
    CHECKSUMS,
    BucketChecksumError,
    Manifest,
    ManifestError,
    pack,
    plan_buckets,
    unpack,
    verify,
    verify_bucket,
)
from rollout.weights.finite import NonFiniteWeightsError
from rollout.weights.inbox import BucketInbox
from rollout.weights.parts import PartsMaker
from tests.test_buckets import SPEC, WIDE_SPEC, _wide_flat, random_flat


def make_parts(flat, layout, algo="xxh3_64", version=1):
    with PartsMaker(flat, layout, checksum_algo=algo) as maker:
        made = [maker.bucket(i) for i in range(len(layout.bucket_nbytes))]
    manifest = Manifest(version, layout, tuple(c for _, c in made), algo, finite=True)
    return manifest, [parts for parts, _ in made]


@pytest.mark.parametrize("algo", CHECKSUMS)
@pytest.mark.parametrize(("spec", "flat_of", "bucket_bytes"), [  # noqa: PT006 - readable as a table
    (SPEC, lambda: random_flat(SPEC), 1024),
    (SPEC, lambda: random_flat(SPEC), 1 << 20),
    (WIDE_SPEC, _wide_flat, 64 << 20),  # leaves straddle the 4 MiB windows; bfloat16; a strided leaf
])
def test_parts_have_the_checksum_of_the_packed_bucket_and_round_trip_every_leaf(algo, spec, flat_of, bucket_bytes):
    flat = flat_of()
    layout = plan_buckets(spec, bucket_bytes)
    packed = pack(flat, layout, version=1, checksum_algo=algo)
    manifest, buckets = make_parts(flat, layout, algo)
    assert manifest.checksums == packed.manifest.checksums
    verify(manifest, buckets)
    verify(manifest, packed.buffers)  # either form passes the same manifest
    out, want = unpack(manifest, buckets), unpack(packed.manifest, packed.buffers)
    assert list(out) == list(spec.paths)
    for path in spec.paths:
        assert out[path].dtype == want[path].dtype and out[path].shape == want[path].shape
        np.testing.assert_array_equal(out[path], want[path], err_msg=path)


def test_a_leaf_already_in_the_slots_dtype_and_order_is_not_copied_and_others_are_cast():
    flat = _wide_flat()
    layout = plan_buckets(WIDE_SPEC, 64 << 20)
    _, (parts,) = make_parts(flat, layout)
    by_path = dict(zip((s.path for s in layout.leaves_of(0)), parts))
    assert np.shares_memory(by_path["a"], flat["a"])  # float32, C order: a view
    assert not np.shares_memory(by_path["b"], flat["b"])  # float32 source, bfloat16 slot: cast
    assert not np.shares_memory(by_path["c"], flat["c"])  # transposed view: made C order
    assert all(p.dtype == np.uint8 and p.ndim == 1 for p in parts)


def test_parts_refuse_nan_or_inf_naming_the_first_leaf_and_its_count_across_windows():
    flat = _wide_flat()
    flat["a"][[0, -1]] = np.nan  # the first and the second window
    flat["d"][5] = np.inf
    layout = plan_buckets(WIDE_SPEC, 64 << 20)
    with pytest.raises(NonFiniteWeightsError, match=r"^a: 2 non-finite value\(s\)"):
        make_parts(flat, layout)
    flat["a"][[0, -1]] = 0.0
    with pytest.raises(NonFiniteWeightsError, match=r"^d: 1 non-finite"):
        make_parts(flat, layout)


def test_a_cast_that_overflows_to_inf_is_refused_while_making_parts():
    flat = random_flat(SPEC)
    flat["layers.0.mlp.up_proj.kernel"][0, 0] = np.finfo(np.float32).max  # Inf in bfloat16
    with pytest.raises(NonFiniteWeightsError, match="up_proj"):
        make_parts(flat, plan_buckets(SPEC, 1 << 20))


def test_a_leaf_of_the_wrong_shape_is_refused_before_any_part_is_made():
    flat = random_flat(SPEC)
    flat["norm.weight"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="norm.weight"):
        make_parts(flat, plan_buckets(SPEC, 1024))


@pytest.mark.parametrize("algo", CHECKSUMS)
def test_a_corrupted_part_is_refused_naming_the_bucket(algo):
    manifest, buckets = make_parts(random_flat(SPEC), plan_buckets(SPEC, 1 << 20), algo, version=2)
    bad = [p.copy() for p in buckets[0]]
    bad[1][3] ^= 0x01  # a flipped bit in one leaf
    with pytest.raises(BucketChecksumError, match="bucket 0 of version 2.*corrupted"):
        verify_bucket(manifest, 0, bad)
    swapped = [buckets[0][1], buckets[0][0], *buckets[0][2:]]  # two leaves exchanged
    with pytest.raises(BucketChecksumError, match="bucket 0 of version 2"):
        verify_bucket(manifest, 0, swapped)


def test_parts_of_the_wrong_count_size_or_type_are_refused_before_hashing():
    manifest, buckets = make_parts(random_flat(SPEC), plan_buckets(SPEC, 1 << 20))
    parts = buckets[0]
    with pytest.raises(BucketChecksumError, match=rf"expected a packed uint8 array or {len(parts)} leaf parts, got {len(parts) - 1} parts"):
        verify_bucket(manifest, 0, parts[:-1])
    with pytest.raises(BucketChecksumError, match="embed_tokens: expected 4096 uint8 bytes"):
        verify_bucket(manifest, 0, [parts[0][:-4], *parts[1:]])
    with pytest.raises(BucketChecksumError, match="embed_tokens: expected 4096 uint8 bytes, got float32"):
        verify_bucket(manifest, 0, [parts[0].view(np.float32), *parts[1:]])
    with pytest.raises(BucketChecksumError, match="got dict"):
        verify_bucket(manifest, 0, {"embed_tokens": parts[0]})


def test_a_bucket_without_a_checksum_is_refused_in_either_form():
    manifest, buckets = make_parts(random_flat(SPEC), plan_buckets(SPEC, 1 << 20))
    streaming = dataclasses.replace(manifest, checksums=(None,))
    with pytest.raises(BucketChecksumError, match="came without a checksum"):
        verify_bucket(streaming, 0, buckets[0])
    verify_bucket(streaming, 0, buckets[0], expected=manifest.checksums[0])


def test_an_inbox_reads_leaves_from_parts():
    flat = random_flat(SPEC)
    manifest, buckets = make_parts(flat, plan_buckets(SPEC, 1024))
    inbox = BucketInbox(manifest, timeout_s=5)
    for index, parts in enumerate(buckets):
        inbox.deliver(index, parts)
    tree = inbox.tree()
    np.testing.assert_array_equal(np.asarray(tree["embed_tokens"]), flat["embed_tokens"])
    assert np.asarray(tree["layers.0.mlp.up_proj.kernel"]).dtype.name == "bfloat16"


def test_a_manifest_whose_leaves_overlap_in_a_bucket_is_refused():
    raw = msgpack.unpackb(pack(random_flat(SPEC), plan_buckets(SPEC, 1 << 20), version=1).manifest.to_bytes())
    raw["slots"][1][1] = 0  # the second leaf claims the first one's bytes
    with pytest.raises(ManifestError, match="inside the leaf before it"):
        Manifest.from_bytes(msgpack.packb(raw))


def test_parts_through_the_object_store_are_verified_and_read_without_a_copy(ray_local):
    import ray

    flat = random_flat(SPEC)
    manifest, buckets = make_parts(flat, plan_buckets(SPEC, 1 << 20))
    (got,) = ray.get([ray.put(buckets[0])])
    verify_bucket(Manifest.from_bytes(manifest.to_bytes()), 0, got)
    out = unpack(manifest, [got])
    np.testing.assert_array_equal(out["embed_tokens"], flat["embed_tokens"])
    assert not out["embed_tokens"].flags.writeable  # a view of the object store, not a copy
