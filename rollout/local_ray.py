"""Start Ray for this process when none is running, listening on loopback only.

A plain `ray.init()` on Linux starts a single-node cluster whose GCS, raylet and object manager
listen on the machine's routable address: anyone on the network could submit work to it. A
service that starts its own Ray has no other nodes, so it binds everything to 127.0.0.1.
Joining an existing cluster (`address=...` or RAY_ADDRESS) is left to Ray's own settings.
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"


def start_local_ray(**init_kwargs: Any) -> None:
    """`ray.init(**init_kwargs)`; a new local cluster listens on loopback unless told otherwise."""
    import ray
    from ray._private import ray_constants

    joining = init_kwargs.get("address") not in (None, "local") or (
        "address" not in init_kwargs and os.environ.get("RAY_ADDRESS")
    )
    if joining or "_node_ip_address" in init_kwargs:
        ray.init(**init_kwargs)
        return
    # Ray resolves "127.0.0.1" to the routable address unless clusters are disabled (its setting
    # for laptops); disable them for the duration of this init so the node keeps the loopback IP.
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(_node_ip_address=LOOPBACK, **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
