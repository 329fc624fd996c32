"""Start Ray for this process when none is running, listening on loopback only; populate the
object store after the node is up instead of while it starts.

A plain `ray.init()` on Linux starts a single-node cluster whose GCS, raylet and object manager
listen on the machine's routable address: anyone on the network could submit work to it. A
service that starts its own Ray has no other nodes, so it binds everything to 127.0.0.1.
Joining an existing cluster (`address=...` or RAY_ADDRESS) is left to Ray's own settings.

Populating the object store. Ray's `preallocate_plasma_memory` maps the whole store with
MAP_POPULATE before the raylet registers with the GCS, and Ray (2.60) gives a node 30 s, fixed
in `ray._private.node.Node`, to register: a 5 GiB store on a fresh host (pages to reclaim first)
went past it ("The current node timed out during startup") and started on the second try; a
TPU host's store of tens of GiB would be slower still. `start_local_ray(preallocate=True)` (and
a `_system_config` asking for it) starts the node without it, then `populate_object_store`
writes through the store once: the same pages end up resident (the store keeps its one mapping
after the objects are freed), and the node's start-up wait no longer depends on the store's
size. On a cluster, run `python -m rollout.local_ray` on each host after `ray start`
(cluster/tpu.yaml does).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

LOOPBACK = "127.0.0.1"
_POPULATE_FRACTION = 0.9  # of the store written through; the rest stays free for Ray's own objects
_POPULATE_CHUNK = 256 << 20  # bytes per object put while populating
_PREALLOCATE_ENV = "RAY_preallocate_plasma_memory"


def start_local_ray(*, preallocate: bool = False, **init_kwargs: Any) -> int:
    """`ray.init(**init_kwargs)`; a new local cluster listens on loopback unless told otherwise.
    `preallocate` (or `_system_config={"preallocate_plasma_memory": True}`, or that setting in
    the environment, RAY_preallocate_plasma_memory=1): populate a new local
    node's object store once it is up (module docstring), rather than while it starts. Returns
    the bytes of the store populated (0 if none)."""
    import ray
    from ray._private import ray_constants

    system_config = dict(init_kwargs.pop("_system_config", None) or {})
    preallocate = bool(system_config.pop("preallocate_plasma_memory", False)) or preallocate
    # the raylet reads its config from the environment too (RAY_<name>): not while it starts
    env_preallocate = os.environ.pop(_PREALLOCATE_ENV, None)
    preallocate = preallocate or (env_preallocate or "").lower() in ("1", "true")
    if system_config:
        init_kwargs["_system_config"] = system_config
    joining = joins_existing_cluster(init_kwargs.get("address"), os.environ.get("RAY_ADDRESS"))
    try:
        if joining or "_node_ip_address" in init_kwargs:
            ray.init(**init_kwargs)
        else:
            # Ray resolves "127.0.0.1" to the routable address unless clusters are disabled (its
            # setting for laptops); disable them for this init so the node keeps the loopback IP.
            saved = ray_constants.ENABLE_RAY_CLUSTER
            ray_constants.ENABLE_RAY_CLUSTER = False
            try:
                ray.init(_node_ip_address=LOOPBACK, **init_kwargs)
            finally:
                ray_constants.ENABLE_RAY_CLUSTER = saved
    finally:
        if env_preallocate is not None:
            os.environ[_PREALLOCATE_ENV] = env_preallocate
    return populate_object_store() if preallocate and not joining else 0


def joins_existing_cluster(address: str | None, env_address: str | None) -> bool:
    """Whether `ray.init(address=address)` joins a running cluster rather than starting a new
    local one; `env_address` is RAY_ADDRESS, which Ray reads when `address` is not given. Ray
    starts a new cluster for no address and for "local".

    >>> joins_existing_cluster(None, None), joins_existing_cluster(None, "local")
    (False, False)
    >>> joins_existing_cluster("auto", None), joins_existing_cluster(None, "10.0.0.2:6379")
    (True, True)
    >>> joins_existing_cluster("local", "auto")
    False
    """
    chosen = address if address is not None else env_address
    return chosen not in (None, "", "local")


def populate_object_store(fraction: float = _POPULATE_FRACTION) -> int:
    """Write through `fraction` of this node's object store once (objects put, then freed), so
    later puts land on resident pages; returns the bytes written. Needs `ray.init` done on the
    node whose store it is (a driver's puts go to its own node's store)."""
    import numpy as np
    import ray

    total = int(_local_store_bytes() * fraction)
    chunk = np.zeros(min(_POPULATE_CHUNK, total), np.uint8)
    sizes = [chunk.nbytes] * (total // chunk.nbytes) + ([total % chunk.nbytes] if total % chunk.nbytes else [])
    refs = [ray.put(chunk[:size]) for size in sizes]
    del refs  # freed: the store keeps its mapping, and with it the pages just written
    return sum(sizes)


def _local_store_bytes() -> int:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return int(node["Resources"].get("object_store_memory", 0))
    raise RuntimeError(f"this process's node {node_id} is not in ray.nodes(); is Ray running here?")


def main() -> int:
    """`python -m rollout.local_ray`: populate this host's object store (after `ray start`)."""
    import ray

    start = time.monotonic()
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    written = populate_object_store()
    print(f"populated {written / 2**30:.1f} GiB of this node's object store in {time.monotonic() - start:.1f}s")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
