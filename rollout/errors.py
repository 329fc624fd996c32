"""Errors of the rollout fleet and of the model configs it accepts, and `describe_error`, the
one-line cause of a Ray error (the engine's own errors live in rollout.engine.types)."""

from __future__ import annotations

from collections.abc import Mapping


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


class WorkerStartError(RuntimeError):
    """A worker's engine failed to start (raised, crashed, or was killed, `start_attempts` times)."""


class WorkerUnavailableError(RuntimeError):
    """No live worker could serve a request (all dead, or retries exhausted)."""


class ServiceClosedError(RuntimeError):
    """The rollout service was shut down (or never started)."""


class UnsupportedConfigError(ValueError):
    """The checkpoint's config.json asks for a feature this engine does not implement."""


def describe_error(err: BaseException) -> str:
    """One line: the root cause of a Ray error (the worker's own exception when there is one)."""
    import ray  # not at import: `import rollout` loads this module and stays free of Ray

    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        if cause is not err:
            return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    if isinstance(err, ray.exceptions.ActorUnavailableError):
        return "the worker is unavailable (it died and is restarting)"
    if isinstance(err, ray.exceptions.RayActorError):
        return "the worker died (" + first_line(str(err)) + ")"
    return f"{type(err).__name__}: {first_line(str(err))}"


def first_line(text: str) -> str:
    """The first non-blank line of `text` (Ray errors carry tracebacks below it)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text
