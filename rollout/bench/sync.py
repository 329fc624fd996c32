"""Weight-sync speed: `sync_weights` of a ~1 GiB float32 tree to a 2-worker fleet, per phase,
against a floor and a per-tensor pattern measured in the same run on the same Ray.

    floor       the same bucket bytes: ray.put once each, ray.get in 2 actors in parallel
                (zero-copy), and every leaf placed on the actor's devices with the engine's
                shardings and placement (rollout.engine.placement: one copy, never aliasing
                the object store). No packing, checksums, validation, finiteness checks or commit.
                Measured twice: dropping the previous copy first (memory is reused warm) and
                keeping it resident while placing (as serving weights are during a live sync);
                ratios use the faster of the two.
    ours        rollout's sync_weights: flatten, spec check, pack + finiteness + checksum (--checksum),
                put, stage on both workers (fetch, verify, engine.stage: checks, cast, placement;
                no second finiteness pass: the checksum proves these are the packer's bytes),
                publish, commit.
    per-tensor  one actor call per leaf per worker (each leaf shipped as the call's argument,
                awaited leaf by leaf), placing it on the devices; the pattern buckets replace.
    lora        (--lora R) sync_weights of a random rank-R LoRA adapter on every linear layer
                (float32 factors): only the adapter is packed and put; each worker merges it
                onto its resident base. Reported beside ours (the full sync) of the same rounds.

The model is Qwen3-shaped with `--layers` layers (11 leaves each, 28 layers = 310 leaves) and a
width solved for `--size-gib`; the engines start with load_format="dummy" (shapes only) and
the synced values are random. Each measurement is repeated; the median is reported, with the
CPU seconds each process spent on it (driver, each worker; from /proc, Linux only): on a host
with fewer cores than busy processes, a method's time follows its CPU total.

    rollout bench sync                               # 1 GiB, 2 workers x 2 devices
    rollout bench sync --size-gib 0.1 --repeats 1    # quick
    rollout bench sync --lora 16                     # also rank-16 adapter syncs, vs the full sync
    rollout bench sync --engine sglang-jax --head-dim 128 --skip-per-tensor
                                     # the sglang-jax backend (in the root: .ci/sglang_root.sh run ...)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import numpy as np

from rollout.engine.backend import BACKENDS
from rollout.fleet_config import FleetConfig
from rollout.weights.buckets import CHECKSUMS, DEFAULT_CHECKSUM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rollout bench sync", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-gib", type=float, default=1.0, help="parameter bytes to sync, in GiB (float32)")
    p.add_argument("--layers", type=int, default=28, help="decoder layers (11 leaves each)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--devices-per-worker", type=int, default=2, help="simulated CPU devices per worker")
    p.add_argument("--bucket-mib", type=int, default=256, help="bucket_bytes of the sync, in MiB")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method (median kept)")
    p.add_argument("--checksum", default=DEFAULT_CHECKSUM, choices=CHECKSUMS, help="bucket checksum")
    p.add_argument("--skip-per-tensor", action="store_true", help="skip the (slow) per-tensor pattern")
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of every worker process, ours and the floor's (repeatable)")
    p.add_argument("--no-preallocate", action="store_true",
                   help="do not populate the object store's memory when Ray starts (Ray's default; "
                        "puts then fault in fresh shared-memory pages now and then)")
    p.add_argument("--engine", default=FleetConfig.engine, choices=sorted(BACKENDS), help="the workers' engine backend")
    p.add_argument("--head-dim", type=int, default=64, help="attention head dim (sglang-jax needs a multiple of 128)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="also time adapter-only syncs of a rank-RANK LoRA on every linear layer (0: off)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    return p.parse_args(argv)


# -- the model ---------------------------------------------------------------------------------


def model_dims(size_bytes: float, layers: int, head_dim: int = 64) -> dict[str, int]:
    """Qwen3 dims with `layers` layers whose float32 parameters come to about `size_bytes`.

    The parameter count is linear in intermediate_size (3 MLP matrices per layer), so two
    counts of the model's own spec fix it; the widest hidden size whose rest fits is taken.
    """
    target = size_bytes / 4
    for hidden in (2048, 1536, 1024, 768, 512, 384, 256, 128):
        heads = max(2, hidden // head_dim)
        dims = dict(vocab_size=32000 if hidden >= 512 else 4096, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim)
        fixed = num_params({**dims, "intermediate_size": 0})
        per_unit = num_params({**dims, "intermediate_size": 1}) - fixed
        if fixed < 0.6 * target:
            return {**dims, "intermediate_size": max(64, int((target - fixed) / per_unit) // 64 * 64)}
    raise ValueError(f"--size-gib {size_bytes / 2**30:.3f} is too small for {layers} layers; lower --layers")


def num_params(dims: dict[str, int]) -> int:
    """Parameters of a tied Qwen3 of these dims, counted on its spec (shapes only)."""
    from rollout.models.bind import ModelDef
    from rollout.models.config import ModelConfig

    config = ModelConfig.from_hf({"architectures": ["Qwen3ForCausalLM"], "tie_word_embeddings": True, **dims})
    return sum(int(np.prod(leaf.shape)) for leaf in ModelDef.create(config).spec.leaves)


def make_config_only_checkpoint(directory: Path, dims: dict[str, int]) -> Path:
    """An HF directory with the config of `dims` and the test tokenizer, without weights (the
    engines start with load_format="dummy", so only config.json and the tokenizer are read)."""
    from rollout.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(directory, vocab_size=dims["vocab_size"], hidden_size=64, intermediate_size=64,
                                num_hidden_layers=1)
    config = json.loads((path / "config.json").read_text())
    config.update(dims, max_window_layers=dims["num_hidden_layers"])
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "model.safetensors").unlink()
    return path


def random_adapter(spec, rank: int, seed: int):
    """A random LoRA adapter (PEFT names, float32) of rank `rank` on every linear layer of `spec`."""
    from rollout.weights.lora import LoraAdapter, LoraConfig, linear_modules

    rng = np.random.default_rng(seed)
    tensors = {}
    shapes = spec.by_path()
    for module, path in linear_modules(spec).items():
        d_in, d_out = shapes[path].shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((rank, d_in), np.float32) * 0.01
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((d_out, rank), np.float32) * 0.01
    return LoraAdapter(tensors, LoraConfig(rank=rank, alpha=2.0 * rank))


def random_params(spec, seed: int) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    return {
        leaf.path: rng.random(leaf.shape, dtype=np.float32) * np.float32(0.02)
        for leaf in tqdm(spec.leaves, desc=f"random params (seed {seed})", unit="leaf", leave=False)
    }


# -- CPU accounting ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process `pid` has used so far (None where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of the driver and `pids` (the workers) over one measured run."""

    def __init__(self, pids: list[int]):
        self.pids = [os.getpid(), *pids]

    def __enter__(self) -> Self:
        self.start = [cpu_seconds(p) for p in self.pids]
        return self

    def __exit__(self, *exc: object) -> None:
        end = [cpu_seconds(p) for p in self.pids]
        self.used = {name: (None if a is None or b is None else b - a)
                     for name, a, b in zip(self.names(), self.start, end)}

    def names(self) -> list[str]:
        return ["driver", *(f"worker{i}" for i in range(len(self.pids) - 1))]


def median_cpu(runs: list[dict[str, float | None]]) -> dict[str, float]:
    """Per process, the median CPU seconds of the runs (processes without /proc left out)."""
    keys = [k for k in runs[0] if all(r.get(k) is not None for r in runs)]
    out: dict[str, float] = {k: statistics.median(float(r[k] or 0.0) for r in runs) for k in keys}
    if out:
        out["total"] = sum(out.values())
    return out


# -- the floor and per-tensor receivers ----------------------------------------------------------


class Receiver:
    """A bench actor that places leaves on its devices with the engine's shardings."""

    def __init__(self, checkpoint: str, devices: int, paths: list[str]):
        import jax

        from rollout.models.bind import ModelDef
        from rollout.models.config import ModelConfig
        from rollout.models.sharding import make_mesh

        mesh = make_mesh(jax.devices()[:devices])
        shardings = ModelDef.create(ModelConfig.from_pretrained(checkpoint)).shardings(mesh)
        self.shardings = {p: shardings[p] for p in paths}
        self.held: dict = {}

    def receive_buckets(self, manifest_bytes: bytes, refs: list, keep_previous: bool) -> float:
        """Floor: fetch every bucket (zero-copy) and place every leaf; returns seconds."""
        import jax
        import ray

        from rollout.engine.placement import place
        from rollout.weights.buckets import Manifest, iter_leaves

        if not keep_previous:
            self.held = {}
        start = time.perf_counter()
        manifest = Manifest.from_bytes(manifest_bytes)
        buffers = ray.get(refs)
        placed = {p: place(v, self.shardings[p]) for p, v in iter_leaves(manifest, buffers)}
        jax.block_until_ready(placed)
        self.held = placed
        return time.perf_counter() - start

    def pid(self) -> int:
        return os.getpid()

    def receive_leaf(self, path: str, array: np.ndarray) -> None:
        """Per-tensor: one call per leaf."""
        from rollout.engine.placement import place

        self.held[path] = place(array, self.shardings[path]).block_until_ready()

    def reset(self) -> None:
        self.held = {}


# -- measurements -------------------------------------------------------------------------------


def measure_ours(svc, params_by_seed: list[dict], repeats: int, cpu: list | None = None) -> tuple[list[float], dict]:
    from tqdm.auto import tqdm

    totals, phases = [], []
    pids = [w["pid"] for w in svc.status()["workers"] if w.get("pid") is not None]
    for i in tqdm(range(repeats), desc="ours: sync_weights", unit="sync"):
        start = time.perf_counter()
        with CpuMeter(pids) as meter:
            svc.sync_weights(params_by_seed[i % 2])
        totals.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(meter.used)
        record = svc.status()["syncs"][-1]
        phases.append({**record["seconds"], **{f"worker{w}.{k}": v for w, s in record["worker_seconds"].items()
                                                 for k, v in s.items()}})
    median_phases = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return totals, median_phases


def measure_floor(
    receivers, buffers: list[np.ndarray], manifest_bytes: bytes, repeats: int, keep_previous: bool,
    cpu: list | None = None,
) -> tuple[list[float], dict]:
    import ray
    from tqdm.auto import tqdm

    totals, puts, gets = [], [], []
    previous = None  # like a sync, keep the last update alive until the next one is in
    pids = ray.get([r.pid.remote() for r in receivers])
    for _ in tqdm(range(repeats), desc="floor: put + get + place", unit="run"):
        start = time.perf_counter()
        with CpuMeter(pids) as meter:
            refs = [ray.put(b) for b in buffers]
            put_done = time.perf_counter()
            ray.get([r.receive_buckets.remote(manifest_bytes, refs, keep_previous) for r in receivers])
        totals.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(meter.used)
        puts.append(put_done - start)
        gets.append(totals[-1] - puts[-1])
        previous = refs  # noqa: F841 - held on purpose
    return totals, {"put": statistics.median(puts), "get+place": statistics.median(gets)}


def measure_per_tensor(receivers, params: dict[str, np.ndarray], repeats: int) -> list[float]:
    import ray
    from tqdm.auto import tqdm

    totals = []
    for _ in range(repeats):
        ray.get([r.reset.remote() for r in receivers])
        start = time.perf_counter()
        for path, array in tqdm(params.items(), desc="per-tensor: one call per leaf per worker", unit="leaf", leave=False):
            ray.get([r.receive_leaf.remote(path, array) for r in receivers])
        totals.append(time.perf_counter() - start)
    return totals


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    import rollout
    from rollout.coordinator.fleet import worker_env
    from rollout.local_ray import start_local_ray
    from rollout.weights.buckets import pack, plan_buckets

    extra_env = dict(item.split("=", 1) for item in args.worker_env)
    size = args.size_gib * 2**30
    dims = model_dims(size, args.layers, args.head_dim)
    ckpt = make_config_only_checkpoint(Path(tempfile.mkdtemp(prefix="rollout-bench-sync-")) / "model", dims)
    store = int(max(2 * 2**30, 5 * size))
    # populated once the node is up (rollout.local_ray): preallocating while it starts timed out
    start_local_ray(num_cpus=max(4, args.workers * 2), object_store_memory=store, include_dashboard=False,
                    log_to_driver=False, preallocate=not args.no_preallocate)
    svc = rollout.RolloutService(
        ckpt, num_workers=args.workers, devices_per_worker=args.devices_per_worker, accelerator="cpu",
        load_format="dummy", max_batch=2, max_seq_len=64, bucket_bytes=args.bucket_mib << 20,
        checksum=args.checksum, env_vars=extra_env, engine=args.engine,
    )
    spec = svc.spec
    print(f"engine: {args.engine}; model: {dims}\n  {len(spec.leaves)} leaves, {spec.nbytes / 2**30:.3f} GiB float32; "
          f"{args.workers} workers x {args.devices_per_worker} CPU devices; bucket {args.bucket_mib} MiB; "
          f"checksum {args.checksum}; "
          f"{os.cpu_count()} host cores; object store {store / 2**30:.1f} GiB, "
          f"{'not ' if args.no_preallocate else ''}preallocated; extra worker env {extra_env or 'none'} "
          "(CPU malloc defaults: rollout.worker.cpu_malloc.CPU_MALLOC)", flush=True)
    params = [random_params(spec, 0), random_params(spec, 1)]
    adapters = [random_adapter(spec, args.lora, 2), random_adapter(spec, args.lora, 3)] if args.lora else []

    env = worker_env(FleetConfig(devices_per_worker=args.devices_per_worker, env_vars=extra_env), "cpu", os.environ)
    receiver_cls = ray.remote(Receiver).options(num_cpus=0, runtime_env={"env_vars": env})
    receivers = [receiver_cls.remote(str(ckpt), args.devices_per_worker, list(spec.paths)) for _ in range(args.workers)]
    packed = pack(params[0], plan_buckets(spec, args.bucket_mib << 20), version=1)
    manifest_bytes = packed.manifest.to_bytes()

    # warm-up: the first runs touch fresh pages everywhere (pack buffers, object store, devices)
    svc.sync_weights(params[0])
    svc.sync_weights(params[1])
    for adapter in adapters:  # compiles the merge
        svc.sync_weights(adapter)
    measure_floor(receivers, packed.buffers, manifest_bytes, 2, keep_previous=True)
    # rounds alternate the methods, so a busy moment of the machine hits all of them alike
    ours, per_tensor, ours_phases = [], [], []
    floors: dict[bool, list[float]] = {False: [], True: []}
    floor_phases: dict[bool, list[dict]] = {False: [], True: []}
    cpu: dict[str, list] = {"floor, dropped first": [], "floor, resident": [], "ours": []}
    lora, lora_phases, lora_bytes = [], [], 0
    for i in range(args.repeats):
        for keep in (False, True):
            times, phases = measure_floor(receivers, packed.buffers, manifest_bytes, 1, keep_previous=keep,
                                          cpu=cpu["floor, resident" if keep else "floor, dropped first"])
            floors[keep] += times
            floor_phases[keep].append(phases)
        times, phases = measure_ours(svc, params[i % 2 :] + params[: i % 2], 1, cpu=cpu["ours"])
        ours += times
        ours_phases.append(phases)
        if adapters:
            times, phases = measure_ours(svc, adapters[i % 2 :] + adapters[: i % 2], 1)
            lora += times
            lora_phases.append(phases)
            lora_bytes = svc.status()["syncs"][-1]["nbytes"]
        if not args.skip_per_tensor and i < max(1, args.repeats - 1):
            per_tensor += measure_per_tensor(receivers, params[0], 1)
    ours_median = {k: statistics.median(p[k] for p in ours_phases) for k in ours_phases[0]}
    floor_median = {keep: {k: statistics.median(p[k] for p in ps) for k in ps[0]} for keep, ps in floor_phases.items()}
    keep_best = statistics.median(floors[True]) < statistics.median(floors[False])
    floor = floors[keep_best]

    med = statistics.median
    gib = spec.nbytes / 2**30
    rows = [
        ("floor, previous copy dropped first", med(floors[False])),
        ("floor, previous copy resident", med(floors[True])),
        ("ours (sync_weights)", med(ours)),
    ]
    if lora:
        rows.append((f"lora rank {args.lora} (sync_weights of the adapter)", med(lora)))
    if per_tensor:
        rows.append((f"per-tensor ({len(spec.leaves)} calls x {args.workers} workers)", med(per_tensor)))
    print(f"\n{'method':<44}{'seconds':>9}{'GiB/s':>8}")
    for name, seconds in rows:
        print(f"{name:<44}{seconds:>9.3f}{gib / seconds:>8.2f}")
    print(f"\n{'ratio':<44}{'value':>9}{'goal':>8}")
    print(f"{'ours / floor (the faster floor)':<44}{med(ours) / med(floor):>9.2f}{'<= 1.5':>8}")
    if per_tensor:
        print(f"{'per-tensor / ours':<44}{med(per_tensor) / med(ours):>9.2f}{'>= 5':>8}")
    if lora:
        print(f"{'lora / ours (seconds)':<44}{med(lora) / med(ours):>9.3f}{'<= 0.05':>8}")
        print(f"{'lora / ours (bytes)':<44}{lora_bytes / spec.nbytes:>9.3f}")
        print(f"\nlora rank {args.lora}: {lora_bytes / 2**20:.2f} MiB per sync (full: {spec.nbytes / 2**20:.1f} MiB)")
    print("\nphases, median seconds:")
    for keep, name in ((False, "floor, dropped first"), (True, "floor, resident")):
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in floor_median[keep].items()))
    print("  ours:  " + ", ".join(f"{k} {v:.3f}" for k, v in ours_median.items()))
    if lora:
        lora_median = {k: statistics.median(p[k] for p in lora_phases) for k in lora_phases[0]}
        print("  lora:  " + ", ".join(f"{k} {v:.3f}" for k, v in lora_median.items()))
    cpu_median = {name: median_cpu(runs) for name, runs in cpu.items()}
    if all(cpu_median.values()):
        floor_cpu = cpu_median["floor, resident" if keep_best else "floor, dropped first"]["total"]
        print(f"\nCPU seconds per run, median (driver and each worker process; {os.cpu_count()} host cores):")
        for name, used in cpu_median.items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in used.items()))
        print(f"  ours / floor (the faster floor), CPU total: {cpu_median['ours']['total'] / floor_cpu:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"dims": dims, "leaves": len(spec.leaves), "bytes": spec.nbytes,
                                         "floor_dropped_first_s": floors[False], "floor_resident_s": floors[True],
                                         "ours_s": ours, "per_tensor_s": per_tensor,
                                         "lora_rank": args.lora, "lora_s": lora, "lora_bytes": lora_bytes,
                                         "ours_phases": ours_median, "floor_phases": floor_median,
                                         "cpu_seconds": cpu_median}, indent=2))
    svc.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
