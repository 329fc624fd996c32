"""Start-up watch: a worker whose engine start keeps failing makes start-up fail, saying why.

Ray restarts a worker whose process dies (FleetConfig.max_restarts; -1 = forever): that keeps a
fleet whole after a crash. Before a worker has ever been ready, though, a death is almost
always its engine's start failing the same way every time (killed for memory in its start-up
compiles, a crash), and Ray would restart it until `ready_timeout_s`, silently. So while the
coordinator waits for its workers, it counts each one's restarts and gives up once a worker
has failed `FleetConfig.start_attempts` starts, with what is known about the last one and what
to change (`StartWatch`). A worker whose constructor raises is not restarted by Ray at all; its
error comes back at once, and `start_hint` is added to it.

What Ray exposes of a restarting actor is read from its actor table (NumRestarts and Pid, the
table `ray list actors` shows; `ray._private.state`, there is no public call without the
dashboard). The last dead process's stderr and the raylet's lines about it (its memory
monitor's kills) come from the Ray log folder of this node, when the worker ran here. All of
this is best effort: what cannot be read is left out, and a watch that cannot read the actor
table never gives up (start-up then waits up to ready_timeout_s, as before).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from rollout.engine.config import EngineConfig
from rollout.fleet_config import FleetConfig

log = logging.getLogger("rollout.coordinator.startup")

_STDERR_LINES = 12  # the tail of a dead worker's stderr put in the error
_RAYLET_KILL = re.compile(r"memory|kill", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def start_hint(fleet: FleetConfig, engine: EngineConfig) -> str:
    """What to change when workers fail to start (most often: the engine's start-up memory)."""
    return (
        "If the engine ran out of memory while starting (it allocates its KV cache and compiles "
        f"and warms up for max_batch={engine.max_batch} sequences of max_seq_len={engine.max_seq_len}, "
        f"on each of num_workers={fleet.num_workers} worker(s)), lower max_batch or max_seq_len, run fewer "
        "workers per host, or give the host more memory; the worker's full log is under the Ray session's "
        "logs folder (/tmp/ray/session_latest/logs/worker-*.err on its node)."
    )


def start_error(err: BaseException) -> str:
    """Why a worker's constructor failed, from the Ray error its ready() call raised: the
    worker's own exception, or the last lines of the error Ray relays (they end with it)."""
    from rollout.errors import describe_error

    text = _ANSI.sub("", str(err))
    if "creation task" not in text:
        return describe_error(err)
    lines = [line.rstrip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("^~")]
    return "its constructor raised:\n  " + "\n  ".join(lines[-_STDERR_LINES // 2 :])


def actor_restarts(handle: Any) -> tuple[int, int] | None:
    """(restarts so far, pid of its current or last process) of an actor, from Ray's actor
    table; None if the table cannot be read."""
    try:
        from ray._private import state

        info = state.actors(actor_id=handle._actor_id.hex())
        return int(info["NumRestarts"]), int(info["Pid"])
    except Exception:  # noqa: BLE001 - best effort: a Ray without this table gives no watch
        return None


class StartWatch:
    """Counts the restarts of workers that are not ready yet; `failing()` names one that has
    failed `attempts` starts."""

    def __init__(self, handles: Sequence[Any], attempts: int):
        self._handles = list(handles)
        self._attempts = attempts
        self._pids: dict[int, list[int]] = {i: [] for i in range(len(self._handles))}
        self._restarts: dict[int, int] = {}

    def failing(self, waiting: Sequence[int]) -> int | None:
        """Poll the workers in `waiting` (not ready yet): the first that has failed `attempts`
        starts, or None."""
        for index in waiting:
            seen = actor_restarts(self._handles[index])
            if seen is None:
                continue
            restarts, pid = seen
            pids = self._pids[index]
            if pid and (not pids or pids[-1] != pid):
                pids.append(pid)
            self._restarts[index] = restarts
            if restarts >= self._attempts:
                return index
        return None

    def report(self, index: int) -> str:
        """What is known of worker `index`'s failed starts: how many, the last process's pid,
        the raylet's kill lines about it and its stderr's last lines."""
        restarts = self._restarts.get(index, 0)
        pids = self._pids[index]
        # the newest pid may be the restart in progress: the last dead one is before it
        dead = [p for p in pids if not _alive(p)] or pids
        head = (
            f"worker {index} failed to start {restarts} time(s): its process died while starting its "
            f"engine and Ray restarted it each time (FleetConfig.start_attempts={self._attempts})"
        )
        if not dead:
            return head + "."
        pid = dead[-1]
        parts = [f"{head}; its last dead process was pid {pid}."]
        raylet, stderr = _ray_log_lines(pid)
        if raylet:
            parts.append("Ray's raylet said about it:\n  " + "\n  ".join(raylet))
        elif stderr is not None:
            parts.append(
                "Ray's raylet logged no kill of it (Ray's memory monitor did not kill it; the kernel's "
                "OOM killer may have: see `dmesg`), so it crashed or exited."
            )
        if stderr:
            parts.append("The last lines of its stderr:\n  " + "\n  ".join(stderr))
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, not ours to signal
    return True


def _ray_log_lines(pid: int) -> tuple[list[str], list[str] | None]:
    """(the raylet's lines about killing process `pid`, the last lines of its stderr) from this
    node's Ray logs; ([], None) when its log is not here (another node, or no logs)."""
    logs = _logs_dir()
    if logs is None:
        return [], None
    files = glob.glob(os.path.join(logs, f"worker-*-{pid}.err"))
    if not files:
        return [], None
    worker_id = os.path.basename(files[0]).split("-")[1]
    # (Ray heads a worker's log with ":job_id:..." lines)
    stderr = [line.rstrip() for line in _tail(files[0], 200) if line.strip() and not line.startswith(":")]
    stderr = stderr[-_STDERR_LINES:]
    raylet = [
        line.strip()[:600]
        for line in _tail(os.path.join(logs, "raylet.out"), 5000)
        if (str(pid) in line or worker_id in line) and _RAYLET_KILL.search(line) and "SIGTERM" not in line
    ][-3:]
    return raylet, stderr


def _logs_dir() -> str | None:
    try:
        from ray._private import worker

        node = worker._global_node
        return None if node is None else str(node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - best effort
        return None


def _tail(path: str, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * lines))
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []
