"""The soak: client threads send many small generate calls while the fleet syncs new weights
every few seconds; every request must be answered exactly once by a version committed while it
ran, with flat worker memory and no restarts."""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import rollout

from .harness import REQUEST_TIMEOUT_S, fleet_versions, total_restarts

# The soak's bound on each worker's RSS growth from after its warm-up to its end. The tiny
# model's whole update is ~0.5 MiB, so a leak of even one copy per sync shows within the run.
RSS_TOLERANCE_MIB = 64


@dataclasses.dataclass
class SoakResult:
    requests: int
    clients: int
    seconds: float = 0.0
    syncs: list[int] = dataclasses.field(default_factory=list)
    sync_seconds: float = 0.0  # of `seconds`, the time spent inside sync calls (the rest: waits between them)
    sync_errors: list[str] = dataclasses.field(default_factory=list)
    client_errors: list[str] = dataclasses.field(default_factory=list)
    answered: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_range: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (low, version, high)
    unknown_versions: set[int] = dataclasses.field(default_factory=set)  # served, never committed
    mixed_completions: int = 0
    worker_versions: frozenset[int] = frozenset()
    rss_before: dict[int, int] = dataclasses.field(default_factory=dict)  # worker -> bytes
    rss_after: dict[int, int] = dataclasses.field(default_factory=dict)
    compiled_before: dict[int, int] = dataclasses.field(default_factory=dict)  # worker -> programs
    compiled_after: dict[int, int] = dataclasses.field(default_factory=dict)
    restarts: int = 0

    @property
    def drift_mib(self) -> dict[int, float]:
        return {w: (self.rss_after[w] - self.rss_before[w]) / 2**20 for w in self.rss_before if w in self.rss_after}

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def worker_rss(svc: rollout.RolloutService) -> dict[int, int]:
    """Resident memory of each worker process (by the pid the worker reports)."""
    import psutil

    return {w["index"]: psutil.Process(w["pid"]).memory_info().rss for w in svc.status()["workers"] if "pid" in w}


_WARMUP_IDS = 1 << 20  # request ids of the warm-up (the soak's are 0..requests-1)


def worker_compiled(svc: rollout.RolloutService) -> dict[int, int]:
    """Programs each worker's engine has compiled so far."""
    return {w["index"]: w.get("compiled", 0) for w in svc.status()["workers"]}


def _soak_request(i: int) -> tuple[list[int], rollout.SamplingParams]:
    prompt = [(i * 7 + k) % 500 + 1 for k in range(2 + i % 6)]  # 2-7 tokens
    return prompt, rollout.SamplingParams(max_tokens=4 + i % 5, temperature=1.0, seed=i % (1 << 30))  # 4-8 new


def soak(svc: rollout.RolloutService, params: Sequence[Any], *, requests: int = 2000, clients: int = 8,
         sync_every_s: float = 2.0, warmup: int = 300, warmup_rounds: int = 6) -> SoakResult:
    """`clients` threads send `requests` one-prompt generate calls (4-8 new tokens) while the
    calling thread syncs `params` (in turn) every `sync_every_s`.

    Memory is read after a warm-up of the same traffic and syncs, in rounds of `warmup`
    requests until a round compiles nothing new on any worker (compiled programs take memory
    too, and would pass for a leak), and again after the run.
    """
    result = SoakResult(requests, clients)
    svc.wait_for_workers(timeout=180)
    syncs = iter(range(1 << 30))

    def sync() -> None:
        start = time.perf_counter()
        try:
            version = svc.sync_weights(params[next(syncs) % len(params)])
            result.syncs.append(version)
        except Exception as err:  # noqa: BLE001 - counted
            result.sync_errors.append(f"{type(err).__name__}: {err}")
        result.sync_seconds += time.perf_counter() - start

    for round_ in range(warmup_rounds):
        compiled = worker_compiled(svc)
        first = _WARMUP_IDS + round_ * warmup
        _drive(svc, range(first, first + warmup), clients, sync_every_s, sync, lambda *a: None, [])
        if round_ > 0 and worker_compiled(svc) == compiled:
            break
    result.syncs.clear()
    result.sync_seconds = 0.0
    result.compiled_before = worker_compiled(svc)
    gc.collect()
    result.rss_before = worker_rss(svc)
    restarts = total_restarts(svc)
    committed = {svc.version}

    answers: Counter = Counter()
    lock = threading.Lock()

    def record(i: int, low: int, high: int, outs: list) -> None:
        with lock:
            for c in outs:
                answers[(i, c.prompt_index, c.sample_index)] += 1
                if not low <= c.weight_version <= high:
                    result.out_of_range.append((low, c.weight_version, high))
                if c.mixed_versions:
                    result.mixed_completions += 1
                result.unknown_versions.add(c.weight_version)

    start = time.perf_counter()
    _drive(svc, range(requests), clients, sync_every_s, sync, record, result.client_errors)
    result.seconds = time.perf_counter() - start
    committed.update(result.syncs)
    result.unknown_versions -= committed
    result.answered = sum(1 for i in range(requests) if answers[(i, 0, 0)] >= 1)
    result.lost = requests - result.answered
    result.duplicates = sum(v - 1 for v in answers.values() if v > 1) + sum(
        v for (i, p, s), v in answers.items() if (p, s) != (0, 0))
    gc.collect()
    result.rss_after = worker_rss(svc)
    result.restarts = total_restarts(svc) - restarts
    result.worker_versions = fleet_versions(svc)
    result.compiled_after = worker_compiled(svc)
    return result


def _drive(svc: rollout.RolloutService, ids: Sequence[int], clients: int, sync_every_s: float,
           sync: Callable[[], None], record: Callable[[int, int, int, list], None], errors: list[str]) -> None:
    """`clients` threads send the requests `ids` (each answered once, via `record`) while this
    thread calls `sync` every `sync_every_s` until they are all answered."""
    queue = iter(ids)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            prompt, sampling = _soak_request(i)
            try:
                low = svc.version
                outs = svc.generate([prompt], sampling, timeout=REQUEST_TIMEOUT_S)
                record(i, low, svc.latest_version, outs)
            except Exception as err:  # noqa: BLE001 - counted as lost
                errors.append(f"request {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=client, name=f"soak-client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    next_sync = time.perf_counter() + sync_every_s
    while any(t.is_alive() for t in threads):
        time.sleep(min(0.1, max(0.0, next_sync - time.perf_counter())))
        if time.perf_counter() >= next_sync:
            sync()
            next_sync = time.perf_counter() + sync_every_s
    for t in threads:
        t.join()

