"""The loopback probe, run as a script in a fresh process (one with no Ray in it yet): start a
service that starts its own local Ray, serve one request, and print every listening socket of
the process tree as one JSON line `SOCKETS [{"ip", "port", "process"}, ...]`.

    python tests/reliability/listening_sockets.py CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import sys

import psutil
import ray

import rollout


def main(checkpoint: str) -> None:
    assert not ray.is_initialized(), "the probe must run where rollout starts Ray itself"
    svc = rollout.RolloutService(checkpoint, num_workers=1, devices_per_worker=1, accelerator="cpu",
                                 max_batch=2, max_seq_len=64)
    try:
        svc.generate([[1, 2, 3]], rollout.SamplingParams(max_tokens=2), timeout=120)
        me = psutil.Process()
        tree = {me.pid: me.name()} | {p.pid: p.name() for p in me.children(recursive=True)}
        sockets = [
            {"ip": c.laddr.ip, "port": c.laddr.port, "process": tree[c.pid]}
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in tree
        ]
        print("SOCKETS " + json.dumps(sockets), flush=True)
    finally:
        svc.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} CHECKPOINT_DIR")
    main(sys.argv[1])
