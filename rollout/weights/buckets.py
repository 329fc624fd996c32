"""Buckets: a parameter update as a few large contiguous byte buffers plus a msgpack manifest.

A weight sync puts each bucket into Ray's object store once; every worker reads the same
buckets (zero-copy: a bucket is one uint8 numpy array) and cuts them back into leaves with the
manifest. Nothing is pickled: a bucket is raw bytes and the manifest is msgpack of plain
numbers and strings, so a worker never unpickles update data.

    layout = plan_buckets(spec, bucket_bytes=256 << 20)  # leaves -> (bucket, offset, nbytes)
    packed = pack(flat, layout, version=3)               # buffers + a Manifest with checksums
    manifest = Manifest.from_bytes(packed.manifest.to_bytes())
    verify(manifest, packed.buffers)                     # raises BucketChecksumError
    leaves = unpack(manifest, packed.buffers)            # {path: read-only view}

Leaves are packed in the spec's order, each at an offset aligned to ALIGN bytes, greedily: a
bucket is closed when the next leaf would overflow `bucket_bytes`; a leaf larger than
`bucket_bytes` gets a bucket of its own. Values are cast to the spec's dtype while packing, so
the buckets hold exactly what the engines serve (a float32 trainer feeding a bfloat16 fleet
sends half the bytes). Each bucket carries a CRC-32, computed chunk by chunk while it is being
filled (the chunk is still in cache), and checked by every reader before staging.
"""

from __future__ import annotations

import dataclasses
import zlib
from types import EllipsisType
from typing import Any, Iterator, Mapping, Sequence

import msgpack
import numpy as np

from rollout.weights.spec import LeafSpec, ParamSpec

MANIFEST_FORMAT = "rollout.buckets/1"
ALIGN = 64  # leaf offsets are multiples of this, so every view is aligned for any dtype
_CHUNK = 4 << 20  # pack and checksum this many bytes at a time (stays in cache between the two)


class BucketChecksumError(ValueError):
    """A bucket's bytes do not match the checksum in its manifest (corrupt or wrong object)."""


class ManifestError(ValueError):
    """Manifest bytes that are not a valid update manifest of this format."""


@dataclasses.dataclass(frozen=True)
class LeafSlot:
    """Where one leaf lives: `nbytes` bytes at `offset` in bucket `bucket`."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    bucket: int
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class BucketLayout:
    """The placement of every leaf; depends only on the spec and `bucket_bytes`."""

    slots: tuple[LeafSlot, ...]
    bucket_nbytes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(self.bucket_nbytes)

    def leaves_of(self, bucket: int) -> list[LeafSlot]:
        return [s for s in self.slots if s.bucket == bucket]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a worker needs to rebuild an update from its buckets."""

    version: int
    layout: BucketLayout
    checksums: tuple[int, ...]  # CRC-32 of each bucket

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "format": MANIFEST_FORMAT,
                "version": self.version,
                "paths": [s.path for s in self.layout.slots],
                "shapes": [list(s.shape) for s in self.layout.slots],
                "dtypes": [s.dtype for s in self.layout.slots],
                "slots": [[s.bucket, s.offset, s.nbytes] for s in self.layout.slots],
                "buckets": list(self.layout.bucket_nbytes),
                "checksum": "crc32",
                "checksums": list(self.checksums),
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        """Parse and check manifest bytes (strings, ints and lists only; no objects)."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as err:
            raise ManifestError(f"expected msgpack manifest bytes, could not parse them: {err}") from err
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ManifestError(f"expected a manifest of format {MANIFEST_FORMAT!r}, got {got!r}")
        n = len(raw["paths"])
        if not (len(raw["shapes"]) == len(raw["dtypes"]) == len(raw["slots"]) == n):
            raise ManifestError("manifest lists paths, shapes, dtypes and slots of different lengths")
        if raw.get("checksum") != "crc32" or len(raw["checksums"]) != len(raw["buckets"]):
            raise ManifestError("expected one crc32 checksum per bucket in the manifest")
        slots = tuple(
            LeafSlot(str(p), tuple(int(d) for d in shape), str(dtype), int(b), int(o), int(nb))
            for p, shape, dtype, (b, o, nb) in zip(raw["paths"], raw["shapes"], raw["dtypes"], raw["slots"])
        )
        layout = BucketLayout(slots, tuple(int(b) for b in raw["buckets"]))
        _check_layout(layout)
        return cls(int(raw["version"]), layout, tuple(int(c) for c in raw["checksums"]))

    @property
    def spec(self) -> ParamSpec:
        return ParamSpec(tuple(LeafSpec(s.path, s.shape, s.dtype) for s in self.layout.slots))


@dataclasses.dataclass(frozen=True)
class PackedUpdate:
    manifest: Manifest
    buffers: list[np.ndarray]  # one contiguous uint8 array per bucket


def plan_buckets(spec: ParamSpec, bucket_bytes: int) -> BucketLayout:
    """Place the leaves of `spec` into buckets of at most `bucket_bytes` (see module docstring).

    >>> from rollout.weights.spec import spec_of_leaves
    >>> spec = spec_of_leaves([("a", (10,), "float32"), ("b", (100,), "float32"), ("c", (4,), "float32")])
    >>> layout = plan_buckets(spec, bucket_bytes=128)
    >>> [(s.path, s.bucket, s.offset, s.nbytes) for s in layout.slots]
    [('a', 0, 0, 40), ('b', 1, 0, 400), ('c', 2, 0, 16)]
    >>> layout.bucket_nbytes
    (40, 400, 16)
    >>> plan_buckets(spec, bucket_bytes=1024).bucket_nbytes  # a at 0, b at 64, c at 512
    (528,)
    """
    if not isinstance(bucket_bytes, int) or bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes={bucket_bytes!r}: expected an integer >= {ALIGN}")
    slots: list[LeafSlot] = []
    sizes: list[int] = []
    used = 0
    for leaf in spec.leaves:
        nbytes = leaf.nbytes
        start = _aligned(used)
        if not sizes or (used > 0 and start + nbytes > bucket_bytes):
            sizes.append(0)
            start = 0
        slots.append(LeafSlot(leaf.path, tuple(leaf.shape), leaf.dtype, len(sizes) - 1, start, nbytes))
        used = start + nbytes
        sizes[-1] = used
    return BucketLayout(tuple(slots), tuple(sizes))


def pack(
    flat: Mapping[str, Any],
    layout: BucketLayout,
    version: int,
    buffers: Sequence[np.ndarray] | None = None,
) -> PackedUpdate:
    """Copy the leaves of `flat` (host arrays, already checked against the layout's spec) into
    contiguous uint8 buckets, casting to each slot's dtype, and checksum every bucket.

    `buffers` may pass preallocated buckets of the right sizes to reuse (fresh host memory is
    slow to touch the first time); their previous content is overwritten.
    """
    if buffers is None:
        buffers = [np.empty(n, np.uint8) for n in layout.bucket_nbytes]
    elif [b.nbytes for b in buffers] != list(layout.bucket_nbytes):
        raise ValueError("reused buffers do not match the bucket layout's sizes")
    crcs = [0] * len(buffers)
    cursor = [0] * len(buffers)  # bytes of each bucket already checksummed
    for slot in layout.slots:
        buf = buffers[slot.bucket]
        if slot.offset > cursor[slot.bucket]:  # alignment padding: zero it so checksums are stable
            buf[cursor[slot.bucket] : slot.offset] = 0
            crcs[slot.bucket] = zlib.crc32(buf[cursor[slot.bucket] : slot.offset], crcs[slot.bucket])
        dst = buf[slot.offset : slot.offset + slot.nbytes].view(_np_dtype(slot.dtype)).reshape(slot.shape)
        src = np.asarray(flat[slot.path])
        if src.shape != slot.shape:
            raise ValueError(f"{slot.path}: expected shape {slot.shape}, got {src.shape}")
        for rows in _row_chunks(slot):
            # copyto reads strided sources (e.g. transposed HF weights) without an extra copy
            np.copyto(dst[rows], src[rows], casting="unsafe")
            crcs[slot.bucket] = zlib.crc32(dst[rows].reshape(-1).view(np.uint8), crcs[slot.bucket])
        cursor[slot.bucket] = slot.offset + slot.nbytes
    manifest = Manifest(version, layout, tuple(crcs))
    return PackedUpdate(manifest, list(buffers))


def checksum(buffer: np.ndarray) -> int:
    """CRC-32 of a bucket (zlib releases the GIL on large buffers, so buckets verify in parallel)."""
    crc = 0
    for lo in range(0, buffer.nbytes, 64 * _CHUNK):
        crc = zlib.crc32(buffer[lo : lo + 64 * _CHUNK], crc)
    return crc


def verify_bucket(manifest: Manifest, index: int, buffer: np.ndarray) -> None:
    """Raise BucketChecksumError unless bucket `index` has the manifest's size and checksum."""
    want_bytes = manifest.layout.bucket_nbytes[index]
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or buffer.nbytes != want_bytes:
        raise BucketChecksumError(
            f"bucket {index} of version {manifest.version}: expected a 1-D uint8 array of "
            f"{want_bytes} bytes, got {buffer.dtype} {buffer.shape}"
        )
    got = checksum(buffer)
    if got != manifest.checksums[index]:
        raise BucketChecksumError(
            f"bucket {index} of version {manifest.version}: crc32 {got:#010x} != "
            f"{manifest.checksums[index]:#010x} in the manifest; the bytes were corrupted or "
            "belong to another update. Retry the sync."
        )


def verify(manifest: Manifest, buffers: Sequence[np.ndarray]) -> None:
    if len(buffers) != len(manifest.layout.bucket_nbytes):
        raise BucketChecksumError(
            f"expected {len(manifest.layout.bucket_nbytes)} buckets for version "
            f"{manifest.version}, got {len(buffers)}"
        )
    for index, buffer in enumerate(buffers):
        verify_bucket(manifest, index, buffer)


def unpack(manifest: Manifest, buffers: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """`{path: array}` views into the buckets (no copy; read-only if the buckets are)."""
    return dict(iter_leaves(manifest, buffers))


def iter_leaves(manifest: Manifest, buffers: Sequence[np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    for slot in manifest.layout.slots:
        raw = buffers[slot.bucket][slot.offset : slot.offset + slot.nbytes]
        yield slot.path, raw.view(_np_dtype(slot.dtype)).reshape(slot.shape)


def _row_chunks(slot: LeafSlot) -> Iterator[slice | EllipsisType]:
    """Slices along the first axis of about _CHUNK bytes each (everything for a scalar)."""
    if not slot.shape or slot.nbytes == 0:
        yield Ellipsis
        return
    rows = slot.shape[0]
    step = max(1, _CHUNK * rows // slot.nbytes)
    for lo in range(0, rows, step):
        yield slice(lo, lo + step)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _check_layout(layout: BucketLayout) -> None:
    """Every slot inside its bucket and matching its shape and dtype (untrusted input)."""
    for s in layout.slots:
        if not 0 <= s.bucket < len(layout.bucket_nbytes):
            raise ManifestError(f"{s.path}: bucket {s.bucket} does not exist ({len(layout.bucket_nbytes)} buckets)")
        if s.offset < 0 or s.offset + s.nbytes > layout.bucket_nbytes[s.bucket]:
            raise ManifestError(f"{s.path}: bytes [{s.offset}, {s.offset + s.nbytes}) overflow bucket {s.bucket}")
        try:
            want = int(np.prod(s.shape, dtype=np.int64)) * _np_dtype(s.dtype).itemsize
        except TypeError as err:
            raise ManifestError(f"{s.path}: unknown dtype {s.dtype!r}") from err
        if want != s.nbytes or s.offset % ALIGN:
            raise ManifestError(f"{s.path}: shape {s.shape} of {s.dtype} is {want} bytes, slot says {s.nbytes}")
