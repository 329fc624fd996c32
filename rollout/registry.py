"""The update registry: the last committed weight update, where a restarted worker finds it.

A small Ray actor (no CPU reserved) that the coordinator writes at each commit point and workers
read when they (re)start. It holds the update's manifest bytes and its bucket ObjectRefs (or a
checkpoint path), which keeps those objects alive in the object store until the next update is
committed. Nothing is pickled across the update path: refs travel inside a dict, so Ray does not
resolve them, and the manifest is msgpack bytes.

An update is a plain dict:
    {"version": 3, "kind": "buckets", "manifest": b"...", "refs": [ObjectRef, ...]}
    {"version": 3, "kind": "checkpoint", "path": "/ckpt/step-3" or "org/repo"}
"""

from __future__ import annotations

from typing import Any


class UpdateRegistry:
    def __init__(self) -> None:
        self._update: dict[str, Any] | None = None
        self._starts: dict[int, int] = {}

    def publish(self, update: dict[str, Any]) -> int:
        """Record `update` as the last committed one (versions only go forward)."""
        if self._update is not None and update["version"] <= self._update["version"]:
            raise ValueError(
                f"version {update['version']} is not newer than the committed {self._update['version']}"
            )
        self._update = update
        return update["version"]

    def latest(self) -> dict[str, Any] | None:
        return self._update

    def latest_version(self) -> int:
        return 0 if self._update is None else int(self._update["version"])

    def worker_started(self, index: int) -> int:
        """Count a worker (re)start; returns how many times worker `index` has started."""
        self._starts[index] = self._starts.get(index, 0) + 1
        return self._starts[index]

    def starts(self) -> dict[int, int]:
        return dict(self._starts)
