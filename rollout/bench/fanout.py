"""Sync fan-out: the bytes the coordinator's node sends per sync to 1, 2 and 4 worker nodes,
with and without the worker-to-worker relay (rollout/relay.py), from Ray's own counters.

Runs on Ray's multi-node test cluster on this machine (ray.cluster_utils.Cluster): a head with
no worker CPUs (the driver, i.e. the coordinator, runs there) and `--nodes` nodes of 1 CPU, one
worker each (`cpus_per_worker=1`), all on 127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the
environment of every process Ray starts, and Ray's own flag in this one (`loopback_only`).

Bytes come from each raylet's object manager: the metric `ray_object_manager_bytes` with
Type="PushedFromLocalPlasma" (cumulative bytes this node's object manager pushed to others) and
Type="Received", scraped from every node's metrics agent (RAY_metrics_report_interval_ms=500 so
they are fresh) before and after each sync. Each fleet size is measured with
`relay_fanout=0` (every worker fetches every bucket from the coordinator's object store) and
with the relay (default fanout 2). The floor for the largest fleet is Ray alone moving the same
buckets: `ray.put` on the head and `ray.get` + one copy into the actor's own memory in one actor
per node at once (no pack, checksum, validation, placement on devices or commit).

    rollout bench fanout                                 # 64 MiB float32 model, 1/2/4 nodes
    rollout bench fanout --size-mib 16 --repeats 1       # quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rollout.bench.sync import make_config_only_checkpoint, model_dims, random_params
from rollout.local_ray import LOOPBACK

if TYPE_CHECKING:
    from rollout.weights.spec import ParamSpec

_METRIC = re.compile(r'^ray_object_manager_bytes\{[^}]*Type="(\w+)"[^}]*\}\s+(\S+)')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rollout bench fanout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mib", type=float, default=64.0, help="float32 parameter bytes per sync, in MiB")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the Qwen3-shaped model")
    p.add_argument("--nodes", type=int, default=4, help="worker nodes (1 CPU each) in the cluster")
    p.add_argument("--counts", default="1,2,4", help="fleet sizes to measure (workers = nodes used)")
    p.add_argument("--bucket-mib", type=int, default=16, help="bucket_bytes of the sync, in MiB")
    p.add_argument("--fanout", type=int, default=2, help="relay_fanout of the 'relay' rows")
    p.add_argument("--repeats", type=int, default=2, help="timed syncs per setting (median kept)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    return p.parse_args(argv)


class Counters:
    """Cumulative object-manager bytes of every node, from its metrics agent."""

    def __init__(self) -> None:
        import ray

        self.ports = {n["NodeID"]: n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}

    def read(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for node, port in self.ports.items():
            text = urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10).read().decode()
            values: dict[str, float] = {}
            for line in text.splitlines():
                match = _METRIC.match(line)
                if match:
                    values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
            out[node] = values
        return out

    def settled(self, timeout_s: float = 15.0) -> dict[str, dict[str, float]]:
        """Read until two reads a report interval apart agree (the agents lag the raylets)."""
        last = self.read()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(1.2)
            now = self.read()
            if now == last:
                return now
            last = now
        return last


def delta(after: dict, before: dict, node: str | None, kind: str) -> float:
    nodes = [node] if node is not None else list(after)
    return sum(after[n].get(kind, 0.0) - before.get(n, {}).get(kind, 0.0) for n in nodes)


def measure_fleet(svc, params: list[dict], counters: Counters, head: str, fanout: int, repeats: int) -> dict:
    """Syncs with relay_fanout=`fanout`: per sync, seconds and bytes (coordinator's node, all)."""
    # The bench flips the coordinator's setting on one fleet (same workers on the same nodes),
    # so the two rows differ in the relay only.
    svc.set_relay_fanout(fanout)
    svc.sync_weights(params[0])  # warm-up at this setting
    rows = []
    for i in range(repeats):
        before = counters.settled()
        start = time.perf_counter()
        svc.sync_weights(params[(i + 1) % 2])
        seconds = time.perf_counter() - start
        after = counters.settled()
        record = svc.status()["syncs"][-1]
        rows.append({"seconds": seconds, "head_sent": delta(after, before, head, "PushedFromLocalPlasma"),
                     "all_sent": delta(after, before, None, "PushedFromLocalPlasma"),
                     "received": delta(after, before, None, "Received"),
                     "relayed_buckets": sum(w.get("relayed_buckets", 0) for w in record["worker_seconds"].values()),
                     "fallbacks": sum(w.get("relay_fallbacks", 0) for w in record["worker_seconds"].values())})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


class Receiver:
    """The floor's actor: fetch the buckets and copy each into memory it owns."""

    def receive(self, refs: list) -> float:
        import ray

        start = time.perf_counter()
        for buffer in ray.get(refs):
            np.array(buffer, copy=True)
        return time.perf_counter() - start


def measure_floor(buffers: list[np.ndarray], count: int, counters: Counters, head: str, repeats: int) -> dict:
    import ray

    receivers: list[Any] = [ray.remote(Receiver)  # actor handles (ray types them loosely)
                           .options(num_cpus=1).remote() for _ in range(count)]
    ray.get([r.receive.remote([ray.put(np.zeros(8, np.uint8))]) for r in receivers])  # started
    rows = []
    for _ in range(repeats + 1):  # the first run warms up
        before = counters.settled()
        start = time.perf_counter()
        refs = [ray.put(b) for b in buffers]
        ray.get([r.receive.remote(refs) for r in receivers])
        seconds = time.perf_counter() - start
        after = counters.settled()
        rows.append({"seconds": seconds, "head_sent": delta(after, before, head, "PushedFromLocalPlasma"),
                     "all_sent": delta(after, before, None, "PushedFromLocalPlasma"),
                     "received": delta(after, before, None, "Received")})
        del refs
    for r in receivers:
        ray.kill(r)
    return {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0]}


def loopback_only() -> None:
    """Keep every Ray process of the bench on 127.0.0.1. Ray takes the machine's routable
    address as a node's address unless clusters are "disabled": the environment variable reaches
    every process Ray starts (read when each imports Ray), Ray's flag covers this process (whose
    Ray may be imported already)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "500")  # fresh counters (see module docstring)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loopback_only()
    import ray
    from ray.cluster_utils import Cluster

    import rollout
    from rollout.weights.buckets import pack, plan_buckets

    counts = sorted({int(c) for c in args.counts.split(",")})
    if max(counts) > args.nodes:
        sys.exit(f"--counts {args.counts}: at most --nodes {args.nodes} workers (one per node)")
    size = args.size_mib * 2**20
    dims = model_dims(size, args.layers)
    ckpt = make_config_only_checkpoint(Path(tempfile.mkdtemp(prefix="rollout-bench-fanout-")) / "model", dims)
    store = int(max(256 << 20, 4 * size))
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, node_ip_address=LOOPBACK, include_dashboard=False, object_store_memory=store))
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    results: dict = {"dims": dims, "nodes": args.nodes, "bucket_mib": args.bucket_mib, "fleets": {}}
    try:
        head = ray.get_runtime_context().get_node_id()
        counters = Counters()
        print(f"model: {dims}; cluster: head (coordinator, 0 CPUs) + {args.nodes} nodes x 1 CPU on {LOOPBACK}; "
              f"bucket {args.bucket_mib} MiB; {os.cpu_count()} host cores", flush=True)
        params: list[dict[str, np.ndarray]] | None = None
        spec: ParamSpec | None = None
        for count in counts:
            svc = rollout.RolloutService(ckpt, num_workers=count, devices_per_worker=1, cpus_per_worker=1,
                                         accelerator="cpu", load_format="dummy", max_batch=2, max_seq_len=64,
                                         bucket_bytes=args.bucket_mib << 20)
            try:
                if params is None:
                    params = [random_params(svc.spec, 0), random_params(svc.spec, 1)]
                    spec = svc.spec
                    results["model_bytes"] = spec.nbytes
                nodes = {ray.get(h.node_id.remote()) for h in svc.workers}
                assert len(nodes) == count and head not in nodes, "workers must sit on distinct worker nodes"
                results["fleets"][count] = {
                    "direct": measure_fleet(svc, params, counters, head, 0, args.repeats),
                    "relay": measure_fleet(svc, params, counters, head, args.fanout, args.repeats),
                }
            finally:
                svc.shutdown()
            print(f"  {count} node(s) measured", file=sys.stderr, flush=True)
        assert params is not None and spec is not None, "counts is never empty"
        packed = pack(params[0], plan_buckets(spec, args.bucket_mib << 20), version=1)
        results["floor"] = {"count": max(counts),
                            **measure_floor(packed.buffers, max(counts), counters, head, args.repeats)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: dict) -> None:
    model = results["model_bytes"]

    def mib(b: float) -> float:
        return b / 2**20
    print(f"\nmodel {mib(model):.1f} MiB per sync; bytes from Ray's object-manager counters (PushedFromLocalPlasma)")
    print(f"{'worker nodes':>12} {'relay':>6} {'coordinator node sent':>22} {'x model':>8} {'all nodes sent':>15}"
          f" {'x model':>8} {'sync s':>8} {'relayed buckets':>16} {'fallbacks':>10}")
    for count, fleet in sorted(results["fleets"].items(), key=lambda kv: int(kv[0])):
        for mode in ("direct", "relay"):
            r = fleet[mode]
            print(f"{count:>12} {'on' if mode == 'relay' else 'off':>6} {mib(r['head_sent']):>18.1f} MiB"
                  f" {r['head_sent'] / model:>8.2f} {mib(r['all_sent']):>11.1f} MiB {r['all_sent'] / model:>8.2f}"
                  f" {r['seconds']:>8.3f} {r['relayed_buckets']:>16.0f} {r['fallbacks']:>10.0f}")
    floor = results["floor"]
    print(f"\nfloor, {floor['count']} nodes (ray.put on the head, ray.get + copy in one actor per node at once): "
          f"{floor['seconds']:.3f} s, coordinator node sent {mib(floor['head_sent']):.1f} MiB "
          f"({floor['head_sent'] / model:.2f} x model)")
    top = results["fleets"][max(results["fleets"], key=int)]
    for mode in ("direct", "relay"):
        print(f"sync_weights to {floor['count']} nodes, relay {'on' if mode == 'relay' else 'off'}: "
              f"{top[mode]['seconds']:.3f} s = {top[mode]['seconds'] / floor['seconds']:.2f} x the floor")


if __name__ == "__main__":
    sys.exit(main())
