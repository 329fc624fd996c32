"""A local Ray asked for a preallocated object store starts without populating it in the raylet
(Ray's fixed 30 s start-up wait) and populates it once the node is up (rollout.local_ray).

Runs in a subprocess: a fresh Ray, in a fresh temp dir, beside the session's Ray.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

STORE_BYTES = 1 << 30  # small enough for a shared host, large enough to be written in chunks

SCRIPT = textwrap.dedent(
    """
    import sys
    import ray
    from rollout.local_ray import start_local_ray

    store, temp_dir = int(sys.argv[1]), sys.argv[2]
    written = start_local_ray(num_cpus=1, object_store_memory=store, include_dashboard=False, log_to_driver=False,
                              _temp_dir=temp_dir, _system_config={"preallocate_plasma_memory": True})
    print("written", written)
    print("put", ray.get(ray.put(b"x" * 1024)) == b"x" * 1024)
    ray.shutdown()
    """
)


def test_a_local_ray_with_a_preallocated_store_populates_it_after_the_node_is_up():
    # a short path: Ray's socket paths under it must stay within the OS limit
    temp_dir = tempfile.mkdtemp(prefix="rlr", dir="/tmp")
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
        run = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(STORE_BYTES), temp_dir],
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
        assert int(lines["written"]) >= 0.85 * STORE_BYTES  # the store was written through
        assert lines["put"] == "True"
        raylet_log = Path(temp_dir, "session_latest", "logs", "raylet.out")
        # the raylet did not populate it while starting (that is what outran Ray's start-up wait)
        assert "MAP_POPULATE" not in raylet_log.read_text()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_address_local_starts_a_new_cluster_so_its_store_is_populated():
    from rollout.local_ray import joins_existing_cluster

    assert not joins_existing_cluster(None, "local")  # RAY_ADDRESS=local: a new local cluster
    assert not joins_existing_cluster("local", "10.0.0.2:6379")  # the argument wins over RAY_ADDRESS
    assert joins_existing_cluster(None, "auto")
    assert joins_existing_cluster("10.0.0.2:6379", None)
