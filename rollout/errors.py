"""Errors of the rollout fleet (the engine's own errors live in rollout.engine.types)."""

from __future__ import annotations

from typing import Mapping


class SyncError(RuntimeError):
    """A weight sync that failed on some workers and was aborted on all of them.

    `failures` maps worker index -> why it failed. Every worker still serves `serving_version`.
    """

    def __init__(self, version: int, serving_version: int, failures: Mapping[int, str]):
        self.version = version
        self.serving_version = serving_version
        self.failures = dict(failures)
        lines = "\n".join(f"  worker {i}: {why}" for i, why in sorted(self.failures.items()))
        super().__init__(
            f"weight sync of version {version} failed on {len(self.failures)} worker(s) and was "
            f"aborted on all of them; the fleet still serves version {serving_version}:\n{lines}\n"
            "Fix the cause and call sync_weights again (the same params may be retried)."
        )


class PlacementError(RuntimeError):
    """The cluster cannot host the requested workers (resources missing or workers not ready)."""


class WorkerUnavailableError(RuntimeError):
    """No live worker could serve a request (all dead, or retries exhausted)."""


class ServiceClosedError(RuntimeError):
    """The rollout service was shut down (or never started)."""
