"""Many hosts on one machine: a fleet on Ray's multi-node test cluster, and the node-loss cases.

`ray.cluster_utils.Cluster` starts a head (no worker CPUs: the driver's node, like a trainer
host) and `NODES` nodes of 1 CPU, each with its own raylet and object store; with
`cpus_per_worker=1` each worker lands on its own node, and a sync crosses from the head's object
store to every node, as between TPU hosts. Removing a node kills its raylet and its worker, as
a preempted spot host does; adding one lets Ray restart the lost worker there.

Everything stays on 127.0.0.1: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (read by Ray when it is
imported, inherited by every process it starts) makes Ray take the loopback address as the node
address instead of the machine's routable one, and every node is started with
`node_ip_address="127.0.0.1"`.

A process can be the driver of one Ray only, and the test session already has its own local
Ray, so the cluster lives in a child process (`MultiNodeDriver`): the caller sends it case
names and gets back plain results (`Outcome`s of tests/reliability/harness.py). The fleet's
workers are FaultyWorkers (fault_worker.py), so a case can hold a worker inside a sync phase.
The reliability report uses the same driver.

    with MultiNodeDriver(checkpoints) as driver:
        driver.call("placement")                       # worker -> node, and the cluster's nodes
        out = driver.call("remove_node_mid_generate")  # an Outcome
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported (see above)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import multiprocessing
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .fault_worker import FaultyWorker
from .harness import (
    Background,
    Outcome,
    engine_params,
    fleet_versions,
    measured,
    record_versions,
    sync_in_thread,
    wait_for_active_slots,
    wait_until,
)

LOOPBACK = "127.0.0.1"
NODES = 3  # worker nodes of 1 CPU; the fleet has one worker on each
NODE_STORE_BYTES = 160 << 20
SYNC_TIMEOUT_S = 30.0
FLEET = dict(
    num_workers=NODES, devices_per_worker=1, cpus_per_worker=1, accelerator="cpu", max_batch=8, max_seq_len=128,
    decode_steps=4, sync_timeout_s=SYNC_TIMEOUT_S, bucket_bytes=64 << 10,  # several buckets: the relay runs per bucket
)
PROMPTS = ([3, 17, 42, 7], [100, 5, 5, 9, 250, 1])
NEW_TOKENS = 8
COMMIT_WAIT_S = 60.0


# -- the cluster (in the child process) ----------------------------------------------------------


class NodeFleet:
    """A loopback multi-node Ray cluster and a fleet with one worker per node."""

    def __init__(self, checkpoints: dict[str, str]):
        import ray
        from ray.cluster_utils import Cluster

        import rollout

        self.checkpoints = checkpoints
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, node_ip_address=LOOPBACK, include_dashboard=False, object_store_memory=NODE_STORE_BYTES))
        for _ in range(NODES):
            self.add_node()
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False)
        cache = tempfile.mkdtemp(prefix="rollout-nodes-jax-")
        env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # a restarted worker compiles nothing
        self.svc = rollout.RolloutService(checkpoints["base"], env_vars=env, worker_class=FaultyWorker, **FLEET)

    def inject_fault(self, worker: int, point: str, **fault: Any) -> None:
        import ray

        ray.get(self.svc.workers[worker].inject_fault.remote(point, **fault), timeout=60)

    def add_node(self):
        return self.cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK, object_store_memory=NODE_STORE_BYTES)

    def close(self) -> None:
        import ray

        try:
            self.svc.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()

    # -- looking at it ---------------------------------------------------------------------------

    def worker_nodes(self) -> dict[int, str]:
        import ray

        return {i: ray.get(h.node_id.remote(), timeout=60) for i, h in enumerate(self.svc.workers)}

    def placement(self) -> dict[str, Any]:
        import ray

        head = self.cluster.head_node.node_id
        return {"workers": self.worker_nodes(), "head": head, "driver": ray.get_runtime_context().get_node_id(),
                "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}

    def greedy(self) -> dict[int, list[tuple[list[int], int]]]:
        """Each worker's greedy (tokens, version) for every prompt."""
        import rollout

        sampling = rollout.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        return {w: [(list(c.token_ids), c.weight_version) for c in self.svc.generate(list(PROMPTS), sampling, worker=w, timeout=120)]
                for w in range(self.svc.fleet_config.num_workers)}

    def sync_from(self, source: str, checkpoint: str) -> dict[str, Any]:
        """Sync the weights of checkpoint `checkpoint` given as `source`: "pytree" (engine
        paths), "hf_names" (a flat {HF tensor name: array} dict) or "hf_dir" (the directory)."""
        from rollout.weights.loader import iter_tensors

        path = self.checkpoints[checkpoint]
        params: Any = {"pytree": lambda: engine_params(Path(path)),
                       "hf_names": lambda: dict(iter_tensors(Path(path))),
                       "hf_dir": lambda: path}[source]()
        version = self.svc.sync_weights(params)
        record = self.svc.status()["syncs"][-1]
        return {"version": version, "greedy": self.greedy(), "worker_seconds": record["worker_seconds"],
                "workers": record["workers"]}

    def node_of(self, worker: int):
        node_id = self.worker_nodes()[worker]
        (node,) = [n for n in self.cluster.worker_nodes if n.node_id == node_id]
        return node

    def remove_node_of(self, worker: int) -> None:
        self.cluster.remove_node(self.node_of(worker), allow_graceful=False)

    def rejoin(self, worker: int, out: Outcome) -> None:
        """Add a node; the lost worker restarts there. Records the seconds from the join to the
        worker serving (a request pinned to it answered) and the version it served first."""
        import rollout

        start = time.monotonic()
        self.add_node()
        sampling = rollout.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        (first,) = self.svc.generate([list(PROMPTS[0])], sampling, worker=worker, timeout=300)
        out.details["join_to_serving_s"] = round(time.monotonic() - start, 2)
        out.details["first_served_version"] = first.weight_version
        out.details["committed_version"] = self.svc.version
        out.details["whole_again"] = self.svc.wait_for_workers(timeout=120)
        wait_until(lambda: fleet_versions(self.svc) == {self.svc.version}, 60, interval=0.5)
        out.details["same_greedy_everywhere"] = len({repr(g) for g in self.greedy().values()}) == 1


# -- the node-loss cases (child process) ---------------------------------------------------------


def remove_node_mid_generate(fleet: NodeFleet, worker: int = 1) -> Outcome:
    """Remove the node of a worker while it decodes: its requests go to the other nodes' workers
    (none lost, none answered twice); a node added back gets the worker, at the fleet's version."""
    import rollout

    svc = fleet.svc
    out = Outcome("node_lost_mid_generate", "nodes", version_before=svc.version)
    with measured(out, svc):
        background = Background(svc, [[9, 10, 11]] * 9, rollout.SamplingParams(max_tokens=64, temperature=1.0, n=2,
                                                                               seed=0, ignore_eos=True))
        out.details["active_before_loss"] = wait_for_active_slots(svc, worker)
        fleet.remove_node_of(worker)
        background.collect(out)
        fleet.rejoin(worker, out)
    record_versions(out, svc)
    out.clear = out.lost == 0 and out.duplicates == 0
    return out


def remove_node_mid_sync(fleet: NodeFleet, point: str, worker: int = 0) -> Outcome:
    """Remove a worker's node while that worker is inside the sync's `point` (a test delay holds
    it there). Worker 0 is the first node's worker: the one that relays the buckets to the other
    nodes. In stage: the sync aborts everywhere and every survivor keeps the previous version.
    In commit (the update is published): the sync completes with the survivors, and the worker
    of the node added back serves the committed version from its first request."""
    svc = fleet.svc
    out = Outcome(f"node_lost_mid_{point}", "nodes", version_before=svc.version)
    checkpoint = "other" if svc.version % 2 == 1 else "base"  # each sync changes the weights
    with measured(out, svc):
        fleet.inject_fault(worker, point, delay_s=5.0)
        background = Background(svc)
        thread, result = sync_in_thread(svc, engine_params(Path(fleet.checkpoints[checkpoint])))
        if point == "commit":  # the update is published (the commit point) before commits go out
            wait_until(lambda: svc.latest_version > out.version_before, COMMIT_WAIT_S)
        time.sleep(1.5 if point == "stage" else 0.5)  # inside the 5 s delay
        fleet.remove_node_of(worker)
        thread.join(timeout=120)
        out.details["sync_finished"] = not thread.is_alive()
        out.raised(result.get("error"))
        out.details["synced_version"] = result.get("version")
        record = svc.status()["syncs"][-1]
        out.details["sync_workers"] = list(record["workers"])
        out.details["worker_seconds"] = record["worker_seconds"]
        out.details["survivor_versions"] = sorted(
            {w["version"] for w in svc.status()["workers"] if w["index"] != worker and "version" in w})
        background.collect(out)
        fleet.rejoin(worker, out)
    record_versions(out, svc)
    if point == "stage":
        out.clear = out.error_is(__import__("rollout").SyncError, f"worker {worker}: stage failed: the worker")
    else:
        out.clear = out.error_type is None and result.get("version") == out.version_before + 1
    return out


def relay_parent_fails(fleet: NodeFleet) -> Outcome:
    """Worker 0 relays the buckets to the other nodes; it fails its stage (an injected error) as
    the sync starts. The others fetch what it never relayed from the coordinator instead (no
    wait for a relay that will not come), and the sync aborts everywhere naming worker 0."""
    import rollout

    svc = fleet.svc
    out = Outcome("relay_parent_fails_in_stage", "nodes", version_before=svc.version)
    checkpoint = "other" if svc.version % 2 == 1 else "base"
    with measured(out, svc):
        fleet.inject_fault(0, "stage", message="injected: the relaying worker fails its stage")
        try:
            svc.sync_weights(engine_params(Path(fleet.checkpoints[checkpoint])))
        except Exception as err:  # noqa: BLE001 - the case is about which error
            out.raised(err)
        record = svc.status()["syncs"][-1]
        out.details["worker_seconds"] = record["worker_seconds"]
        out.details["buckets"] = record["buckets"]
    record_versions(out, svc)
    out.clear = out.error_is(rollout.SyncError, "worker 0: stage failed: InjectedFault")
    return out


CASES = {
    "relay_parent_fails": relay_parent_fails,
    "placement": lambda fleet: fleet.placement(),
    "sync_from": lambda fleet, source, checkpoint: fleet.sync_from(source, checkpoint),
    "greedy": lambda fleet: fleet.greedy(),
    "version": lambda fleet: fleet.svc.version,
    "remove_node_mid_generate": lambda fleet: remove_node_mid_generate(fleet),
    "remove_node_mid_stage": lambda fleet: remove_node_mid_sync(fleet, "stage"),
    "remove_node_mid_commit": lambda fleet: remove_node_mid_sync(fleet, "commit"),
}


def serve(conn: Any, checkpoints: dict[str, str]) -> None:
    """The child process: start the cluster and the fleet, then run the cases asked for."""
    fleet = None
    try:
        fleet = NodeFleet(checkpoints)
        conn.send(("ready", None))
        while True:
            message = conn.recv()
            if message is None:
                return
            name, kwargs = message
            try:
                conn.send(("ok", CASES[name](fleet, **kwargs)))
            except Exception as err:  # noqa: BLE001 - reported to the caller
                conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    except Exception as err:  # noqa: BLE001
        conn.send(("error", f"the multi-node cluster did not start: {type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if fleet is not None:
            fleet.close()
        conn.close()


# -- the caller's side ---------------------------------------------------------------------------


class MultiNodeDriver:
    """A child process that drives a multi-node cluster and its fleet (see module docstring)."""

    def __init__(self, checkpoints: dict[str, str | Path], start_timeout_s: float = 600.0):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, {k: str(v) for k, v in checkpoints.items()}),
                                       name="rollout-multinode", daemon=True)
        self.process.start()
        child.close()
        self._wait(start_timeout_s)

    def call(self, name: str, timeout_s: float = 600.0, **kwargs: Any) -> Any:
        self.send(name, **kwargs)
        return self.result(timeout_s)

    def send(self, name: str, **kwargs: Any) -> None:
        """Start a case; `result()` waits for it (meanwhile the caller may look at the cluster)."""
        self._conn.send((name, kwargs))

    def done(self, timeout_s: float = 0.0) -> bool:
        return self._conn.poll(timeout_s)

    def result(self, timeout_s: float = 600.0) -> Any:
        return self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> Any:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"the multi-node driver did not answer within {timeout_s:g}s")
        status, value = self._conn.recv()
        if status != "ok" and status != "ready":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=120)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=30)

    def __enter__(self) -> MultiNodeDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def process_tree_sockets(pid: int | None = None) -> list[dict[str, Any]]:
    """Every inet socket of process `pid` (default: this one) and all its descendants:
    [{"process", "pid", "status", "local", "remote"}] (remote "" when not connected)."""
    import psutil

    root = psutil.Process(pid)
    tree = {root.pid: root}
    for child in root.children(recursive=True):
        tree[child.pid] = child
    sockets = []
    for pid_, proc in tree.items():
        try:
            name = proc.name()
            connections = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in connections:
            sockets.append({"process": name, "pid": pid_, "status": c.status,
                            "local": c.laddr.ip if c.laddr else "", "remote": c.raddr.ip if c.raddr else ""})
    return sockets


def node_ok(out: Outcome) -> bool:
    """A node-loss case went as it must: its error (if any) is the expected one, no request was
    lost or answered twice, and the worker of the node added back serves the fleet's version."""
    return (out.clear and out.lost == 0 and out.duplicates == 0 and out.worker_versions == {out.fleet_version}
            and out.details.get("first_served_version") == out.fleet_version
            and bool(out.details.get("whole_again")) and bool(out.details.get("same_greedy_everywhere")))


NODE_CASES = ("remove_node_mid_generate", "remove_node_mid_stage", "remove_node_mid_commit")


def run_node_cases(checkpoints: dict[str, str | Path]) -> list[Outcome]:
    """Every node-loss case on a fresh multi-node cluster (for bench/reliability_report.py)."""
    with MultiNodeDriver(checkpoints) as driver:
        driver.call("sync_from", source="pytree", checkpoint="base")
        return [driver.call(name) for name in NODE_CASES]
