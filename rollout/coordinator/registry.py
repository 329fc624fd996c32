"""The update registry: the last committed weight update, where a restarted worker finds it.

A small Ray actor (no CPU reserved) that the coordinator writes at each commit point and workers
read when they (re)start. It holds a `rollout.protocol.CommittedUpdate`: the update's msgpack
manifest bytes and its bucket ObjectRefs (or a checkpoint path), which keeps those objects
alive in the object store until the next update is committed. The refs travel inside the
update, so Ray does not resolve them; the manifest stays bytes until a worker parses it with
msgpack.
"""

from __future__ import annotations

from rollout.protocol import CommittedUpdate


class UpdateRegistry:
    def __init__(self) -> None:
        self._update: CommittedUpdate | None = None
        self._starts: dict[int, int] = {}

    def publish(self, update: CommittedUpdate) -> int:
        """Record `update` as the last committed one (versions only go forward)."""
        if self._update is not None and update.version <= self._update.version:
            raise ValueError(f"version {update.version} is not newer than the committed {self._update.version}")
        self._update = update
        return update.version

    def latest(self) -> CommittedUpdate | None:
        return self._update

    def worker_started(self, index: int) -> int:
        """Count a worker (re)start; returns how many times worker `index` has started."""
        self._starts[index] = self._starts.get(index, 0) + 1
        return self._starts[index]

    def starts(self) -> dict[int, int]:
        return dict(self._starts)
