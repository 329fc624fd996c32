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
sends half the bytes). The packer also counts NaN/Inf (NonFiniteWeightsError: nothing is
returned) on each stretch it has just copied, and says so in the manifest (`finite`): a reader
whose checksums match holds those very bytes and need not count again.

Each bucket carries a checksum that every reader checks before staging. Two algorithms:

    xxh3_64  (default) xxHash's XXH3 (64-bit) of each 4 MiB window (WINDOW) of the bucket, then
             XXH3 of those digests and the length. The packer hashes each window right after
             copying it, while it is in cache, in the same thread pool task, so windows are
             packed and hashed in parallel and no pass re-reads the bucket; a single streaming
             hash state would force the windows through one thread in order. Catches changed,
             reordered, moved or missing bytes and wrong objects; runs at memory speed. Not
             cryptographic.
    crc32    zlib's CRC-32 (~3 GB/s here) over the whole bucket, after packing: catches every
             burst error up to 32 bits, at ~0.3 s per GiB on the coordinator and on every worker.

The manifest format is versioned (MANIFEST_FORMAT): a reader refuses another format with an
error that names both, e.g. a worker of an older rollout release reading a newer coordinator's
update (the checksum of format 1 was a 64-bit word sum, blind to words reordered in a block).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

import msgpack
import numpy as np
import xxhash

from rollout.weights.finite import count_non_finite, is_floating, non_finite_error
from rollout.weights.spec import LeafSpec, ParamSpec

MANIFEST_FORMAT = "rollout.buckets/2"  # 2: xxh3_64 windows replaced format 1's sum64
ALIGN = 64  # leaf offsets are multiples of this, so every view is aligned for any dtype
CHECKSUMS = ("xxh3_64", "crc32")
DEFAULT_CHECKSUM = "xxh3_64"
# bytes a pack task copies, checks and hashes at a time; part of the xxh3_64 checksum's
# definition (changing it changes every checksum: bump MANIFEST_FORMAT)
WINDOW = 4 << 20
_CRC_CHUNK = 256 << 20  # zlib.crc32 takes at most 4 GiB per call; chunks also keep the GIL free


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
    # One per bucket; None while streaming: that bucket's checksum travels with the bucket.
    checksums: tuple[int | None, ...]
    checksum: str = DEFAULT_CHECKSUM  # the algorithm, one of CHECKSUMS
    # True when the packer counted every floating value finite: a reader whose checksums
    # match may skip its own finiteness pass.
    finite: bool = False
    # None: a full update of the model's parameters; otherwise what kind of partial update the
    # leaves are and its numbers, e.g. a LoRA adapter's (rollout.weights.lora.LoraConfig.to_meta)
    adapter: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        extra = {} if self.adapter is None else {"adapter": self.adapter}
        return msgpack.packb(
            {
                **extra,
                "format": MANIFEST_FORMAT,
                "version": self.version,
                "paths": [s.path for s in self.layout.slots],
                "shapes": [list(s.shape) for s in self.layout.slots],
                "dtypes": [s.dtype for s in self.layout.slots],
                "slots": [[s.bucket, s.offset, s.nbytes] for s in self.layout.slots],
                "buckets": list(self.layout.bucket_nbytes),
                "checksum": self.checksum,
                "checksums": list(self.checksums),
                "finite": self.finite,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and check manifest bytes (strings, ints and lists only; no objects)."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as err:
            raise ManifestError(f"expected msgpack manifest bytes, could not parse them: {err}") from err
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            hint = (
                "; the coordinator and the workers run different rollout releases: install the same one on every node"
                if isinstance(got, str) and got.startswith("rollout.buckets/")
                else ""
            )
            raise ManifestError(f"expected a manifest of format {MANIFEST_FORMAT!r}, got {got!r}{hint}")
        n = len(raw["paths"])
        if not (len(raw["shapes"]) == len(raw["dtypes"]) == len(raw["slots"]) == n):
            raise ManifestError("manifest lists paths, shapes, dtypes and slots of different lengths")
        if raw.get("checksum") not in CHECKSUMS or len(raw["checksums"]) != len(raw["buckets"]):
            raise ManifestError(f"expected one checksum per bucket, of an algorithm in {CHECKSUMS}")
        slots = tuple(
            LeafSlot(str(p), tuple(int(d) for d in shape), str(dtype), int(b), int(o), int(nb))
            for p, shape, dtype, (b, o, nb) in zip(raw["paths"], raw["shapes"], raw["dtypes"], raw["slots"])
        )
        layout = BucketLayout(slots, tuple(int(b) for b in raw["buckets"]))
        _check_layout(layout)
        sums = tuple(None if c is None else int(c) for c in raw["checksums"])
        adapter = raw.get("adapter")
        if adapter is not None and not isinstance(adapter, dict):
            raise ManifestError(f"expected the manifest's adapter entry to be a map, got {type(adapter).__name__}")
        return cls(int(raw["version"]), layout, sums, raw["checksum"], raw.get("finite") is True, adapter)

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


class Packer:
    """Packs the leaves of `flat` (host arrays of the layout's shapes) into contiguous uint8
    buckets, casting to each slot's dtype, one bucket at a time, so a caller can hand bucket k
    on while packing bucket k+1.

    A bucket is packed in windows of WINDOW bytes, spread over `threads` threads (numpy and
    xxhash release the GIL): each window's stretch of every leaf is copied, then counted finite
    and hashed for the checksum while it is still in cache, so packing reads each source byte
    from memory once. A leaf with NaN or Inf fails the bucket with NonFiniteWeightsError.

    `buffers` may pass preallocated buckets of the right sizes to reuse (fresh host memory is
    slow to touch the first time); their previous content is overwritten.
    """

    def __init__(
        self,
        flat: Mapping[str, Any],
        layout: BucketLayout,
        buffers: Sequence[np.ndarray] | None = None,
        *,
        checksum_algo: str = DEFAULT_CHECKSUM,
        threads: int = 2,
    ):
        if checksum_algo not in CHECKSUMS:
            raise ValueError(f"checksum_algo={checksum_algo!r}: expected one of {CHECKSUMS}")
        if buffers is None:
            buffers = [np.empty(n, np.uint8) for n in layout.bucket_nbytes]
        elif [b.nbytes for b in buffers] != list(layout.bucket_nbytes):
            raise ValueError("reused buffers do not match the bucket layout's sizes")
        for slot in layout.slots:
            shape = getattr(flat[slot.path], "shape", None)
            if tuple(shape or ()) != slot.shape:
                raise ValueError(f"{slot.path}: expected shape {slot.shape}, got {shape}")
        self.flat, self.layout, self.buffers = flat, layout, list(buffers)
        self.checksum_algo = checksum_algo
        self._pool = ThreadPoolExecutor(max(1, threads))
        self._padding: dict[int, list[tuple[int, int]]] = {}
        for bucket, start, stop in _padding(layout):
            self._padding.setdefault(bucket, []).append((start, stop))

    def pack_bucket(self, index: int) -> int:
        """Fill bucket `index`; returns its checksum. Raises NonFiniteWeightsError."""
        buffer = self.buffers[index]
        slots = self.layout.leaves_of(index)
        # a window copies an element range of each C-contiguous source; a strided one (e.g. a
        # transposed HF weight) is copied whole into its slot first (copyto reads it in place)
        # and its windows only check and sum it
        sources: list[np.ndarray | None] = []
        strided: list[tuple[LeafSlot, np.ndarray]] = []
        for slot in slots:
            source = np.asarray(self.flat[slot.path])
            sources.append(source.reshape(-1) if source.flags.c_contiguous else None)
            if sources[-1] is None:
                strided.append((slot, source))
        list(self._pool.map(lambda job: _cast_into(leaf_view(buffer, job[0]), job[1]), strided))
        windows = list(self._pool.map(
            lambda lo: self._pack_window(buffer, lo, slots, sources, self._padding.get(index, [])),
            range(0, max(buffer.nbytes, 1), WINDOW),
        ))
        bad: dict[str, int] = {}
        for _, window_bad in windows:
            for path, count in window_bad:
                bad[path] = bad.get(path, 0) + count
        if bad:
            path = next(slot.path for slot in slots if slot.path in bad)  # the first in spec order
            raise non_finite_error(path, bad[path])
        if self.checksum_algo == "xxh3_64":
            return _combine_windows([digest for digest, _ in windows], buffer.nbytes)
        return checksum(buffer, self.checksum_algo)

    def _pack_window(
        self, buffer: np.ndarray, lo: int, slots: list[LeafSlot], sources: list[np.ndarray | None],
        padding: list[tuple[int, int]],
    ) -> tuple[int, list[tuple[str, int]]]:
        """Copy, count and hash bytes [lo, lo + WINDOW) of `buffer`: (xxh3 digest or 0, [(path, non-finite)])."""
        hi = min(lo + WINDOW, buffer.nbytes)
        for start, stop in padding:  # alignment gaps: zeroed so checksums are reproducible
            if start < hi and stop > lo:
                buffer[max(start, lo) : min(stop, hi)] = 0
        bad: list[tuple[str, int]] = []
        for slot, source in zip(slots, sources):
            begin, end = max(lo, slot.offset), min(hi, slot.offset + slot.nbytes)
            if begin >= end:
                continue
            dtype = numpy_dtype(slot.dtype)
            # offsets are ALIGN-aligned and windows WINDOW-aligned: both multiples of the itemsize
            dst = buffer[begin:end].view(dtype)
            if source is not None:
                first = (begin - slot.offset) // dtype.itemsize
                _cast_into(dst, source[first : first + dst.size])
            if is_floating(dtype):
                count = count_non_finite(dst)
                if count:
                    bad.append((slot.path, count))
        digest = xxhash.xxh3_64_intdigest(buffer[lo:hi].data) if self.checksum_algo == "xxh3_64" else 0
        return digest, bad

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pack(
    flat: Mapping[str, Any],
    layout: BucketLayout,
    version: int,
    buffers: Sequence[np.ndarray] | None = None,
    *,
    checksum_algo: str = DEFAULT_CHECKSUM,
    threads: int = 2,
    adapter: dict[str, Any] | None = None,
) -> PackedUpdate:
    """Pack every bucket (see Packer) and return them with their manifest (`adapter`: see Manifest)."""
    with Packer(flat, layout, buffers, checksum_algo=checksum_algo, threads=threads) as packer:
        sums = [packer.pack_bucket(i) for i in range(len(layout.bucket_nbytes))]
    manifest = Manifest(version, layout, tuple(sums), checksum_algo, finite=True, adapter=adapter)
    return PackedUpdate(manifest, packer.buffers)


def checksum(buffer: np.ndarray, algo: str = DEFAULT_CHECKSUM) -> int:
    """The checksum of one bucket (see the module docstring for the algorithms).

    >>> checksum(np.zeros(8, np.uint8)) != checksum(np.zeros(16, np.uint8))  # length counts
    True
    >>> words = np.arange(4, dtype=np.uint64)
    >>> checksum(words.view(np.uint8)) != checksum(words[[1, 0, 2, 3]].view(np.uint8))  # so does order
    True
    """
    if algo == "crc32":
        crc = 0
        for lo in range(0, buffer.nbytes, _CRC_CHUNK):
            crc = zlib.crc32(buffer[lo : lo + _CRC_CHUNK].data, crc)
        return crc
    if algo != "xxh3_64":
        raise ValueError(f"unknown checksum {algo!r}: expected one of {CHECKSUMS}")
    digests = [xxhash.xxh3_64_intdigest(buffer[lo : lo + WINDOW].data) for lo in range(0, max(buffer.nbytes, 1), WINDOW)]
    return _combine_windows(digests, buffer.nbytes)


def _combine_windows(digests: Sequence[int], nbytes: int) -> int:
    """xxh3_64 of the windows' digests in order, then the bucket's length."""
    return xxhash.xxh3_64_intdigest(np.array([*digests, nbytes], np.uint64).tobytes())


def verify_bucket(manifest: Manifest, index: int, buffer: np.ndarray, expected: int | None = None) -> None:
    """Raise BucketChecksumError unless bucket `index` has the manifest's size and checksum
    (or `expected`, the checksum that came with the bucket when the manifest has none)."""
    want_bytes = manifest.layout.bucket_nbytes[index]
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or buffer.nbytes != want_bytes:
        raise BucketChecksumError(
            f"bucket {index} of version {manifest.version}: expected a 1-D uint8 array of "
            f"{want_bytes} bytes, got {buffer.dtype} {buffer.shape}"
        )
    want = manifest.checksums[index] if manifest.checksums[index] is not None else expected
    if want is None:
        raise BucketChecksumError(f"bucket {index} of version {manifest.version} came without a checksum")
    got = checksum(buffer, manifest.checksum)
    if got != want:
        raise BucketChecksumError(
            f"bucket {index} of version {manifest.version}: {manifest.checksum} {got:#x} != "
            f"{want:#x} expected; the bytes were corrupted or belong to another update. Retry the sync."
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
        yield slot.path, leaf_view(buffers[slot.bucket], slot)


def leaf_view(bucket: np.ndarray, slot: LeafSlot) -> np.ndarray:
    """The leaf of `slot` as an array viewing its bucket's bytes (no copy)."""
    return bucket[slot.offset : slot.offset + slot.nbytes].view(numpy_dtype(slot.dtype)).reshape(slot.shape)


def _cast_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy `src` into `dst`, casting to its dtype (an overflow to Inf is counted afterwards)."""
    with np.errstate(over="ignore"):
        np.copyto(dst, src, casting="unsafe")


def _padding(layout: BucketLayout) -> Iterator[tuple[int, int, int]]:
    """(bucket, start, stop) of every alignment gap between leaves."""
    ends: dict[int, int] = {}
    for slot in layout.slots:
        end = ends.get(slot.bucket, 0)
        if slot.offset > end:
            yield slot.bucket, end, slot.offset
        ends[slot.bucket] = slot.offset + slot.nbytes


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name, bfloat16 included."""
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
            want = int(np.prod(s.shape, dtype=np.int64)) * numpy_dtype(s.dtype).itemsize
        except TypeError as err:
            raise ManifestError(f"{s.path}: unknown dtype {s.dtype!r}") from err
        if want != s.nbytes or s.offset % ALIGN:
            raise ManifestError(f"{s.path}: shape {s.shape} of {s.dtype} is {want} bytes, slot says {s.nbytes}")
