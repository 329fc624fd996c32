"""Server metrics: Prometheus text at GET /metrics (prometheus_client), mirrored to Ray's metrics.

Every number is recorded twice: into this server's own prometheus_client registry (served at
/metrics, so any Prometheus can scrape the server directly) and into `ray.util.metrics` (Ray
exports those through its metrics agent, so the Ray dashboard's Grafana panels and `ray
metrics` see them with the `ray_` prefix). Fleet gauges (queue depth, active slots, weight
version, sync phase seconds) come from `RolloutService.status()`, refreshed on each scrape and
every few seconds by the server.

Names: rollout_requests_total{endpoint,status}, rollout_requests_cancelled_total{endpoint},
rollout_requests_running, rollout_prompt_tokens_total, rollout_generation_tokens_total,
rollout_time_to_first_token_seconds, rollout_time_per_output_token_seconds,
rollout_request_latency_seconds, rollout_queue_depth{worker}, rollout_active_slots{worker},
rollout_weight_version, rollout_sync_phase_seconds{phase} (the last sync),
rollout_weight_syncs_total{status}.
"""

from __future__ import annotations

import logging
from typing import Any

import prometheus_client as prom

log = logging.getLogger("rollout.server")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class _Metric:
    """One metric in both systems; `labels` are given by keyword on each record."""

    def __init__(self, kind: str, name: str, doc: str, registry: prom.CollectorRegistry,
                 labels: tuple[str, ...] = (), buckets: tuple[float, ...] | None = None):
        self.kind = kind
        self.labels = labels
        extra = {"buckets": buckets} if buckets else {}
        cls = {"counter": prom.Counter, "gauge": prom.Gauge, "histogram": prom.Histogram}[kind]
        self.prom = cls(name, doc, labels, registry=registry, **extra)
        self.ray: Any = None
        try:
            from ray.util import metrics as ray_metrics

            ray_cls = {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge,
                       "histogram": ray_metrics.Histogram}[kind]
            ray_extra = {"boundaries": list(buckets)} if buckets else {}
            # Ray counters are exported with a _total suffix of their own
            self.ray = ray_cls(name, description=doc, tag_keys=labels, **ray_extra)
        except Exception as err:  # noqa: BLE001 - no Ray metrics agent: Prometheus text still works
            log.warning("Ray metric %s unavailable (%s: %s); /metrics still has it", name, type(err).__name__, err)

    def _prom(self, tags: dict[str, str]) -> Any:
        return self.prom.labels(**tags) if self.labels else self.prom

    def inc(self, value: float = 1.0, **tags: str) -> None:
        self._prom(tags).inc(value)
        if self.ray is None:
            return
        if self.kind == "gauge":  # Ray gauges are only set: mirror Prometheus' current value
            self.ray.set(self._prom(tags)._value.get(), tags=tags or None)
        else:
            self.ray.inc(value, tags=tags or None)

    def set(self, value: float, **tags: str) -> None:
        self._prom(tags).set(value)
        if self.ray is not None:
            self.ray.set(value, tags=tags or None)

    def observe(self, value: float, **tags: str) -> None:
        self._prom(tags).observe(value)
        if self.ray is not None:
            self.ray.observe(value, tags=tags or None)


class ServerMetrics:
    """The server's metrics; one instance per server (its own Prometheus registry)."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = _Metric("counter", "rollout_requests", "HTTP requests answered, by endpoint and status", r,
                                ("endpoint", "status"))
        self.cancelled = _Metric("counter", "rollout_requests_cancelled",
                                 "requests whose client went away before the end (cancelled on their worker)",
                                 r, ("endpoint",))
        self.running = _Metric("gauge", "rollout_requests_running", "generation requests in flight on this server", r)
        self.prompt_tokens = _Metric("counter", "rollout_prompt_tokens", "prompt tokens of served requests", r)
        self.generation_tokens = _Metric("counter", "rollout_generation_tokens", "tokens generated for requests", r)
        self.ttft = _Metric("histogram", "rollout_time_to_first_token_seconds",
                            "streamed requests: arrival to first token", r, buckets=LATENCY_BUCKETS)
        self.tpot = _Metric("histogram", "rollout_time_per_output_token_seconds",
                            "per-token latency after the first token, per request", r, buckets=TOKEN_BUCKETS)
        self.latency = _Metric("histogram", "rollout_request_latency_seconds", "arrival to last token", r,
                               buckets=LATENCY_BUCKETS)
        self.queue_depth = _Metric("gauge", "rollout_queue_depth", "requests waiting for a slot, per worker", r,
                                   ("worker",))
        self.active_slots = _Metric("gauge", "rollout_active_slots", "decode slots in use, per worker", r, ("worker",))
        self.weight_version = _Metric("gauge", "rollout_weight_version", "the fleet's committed weight version", r)
        self.sync_phase = _Metric("gauge", "rollout_sync_phase_seconds", "seconds of each phase of the last sync", r,
                                  ("phase",))
        self.syncs = _Metric("counter", "rollout_weight_syncs", "weight syncs requested through /v1/weights", r,
                             ("status",))

    def request_done(self, endpoint: str, status: int, *, prompt_tokens: int = 0, completion_tokens: int = 0,
                     latency_s: float | None = None, first_token_s: float | None = None) -> None:
        self.requests.inc(endpoint=endpoint, status=str(status))
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.inc(completion_tokens)
        if latency_s is not None:
            self.latency.observe(latency_s)
            if completion_tokens > 1:
                decode_s = latency_s - (first_token_s if first_token_s is not None else 0.0)
                denominator = completion_tokens - 1 if first_token_s is not None else completion_tokens
                self.tpot.observe(max(0.0, decode_s) / denominator)
        if first_token_s is not None:
            self.ttft.observe(first_token_s)

    def update_fleet(self, status: dict[str, Any]) -> None:
        """Fleet gauges from RolloutService.status()."""
        self.weight_version.set(status["version"])
        for w in status["workers"]:
            self.queue_depth.set(w.get("queue_depth", 0), worker=str(w["index"]))
            self.active_slots.set(w.get("active_slots", 0), worker=str(w["index"]))
        done = [s for s in status.get("syncs", []) if s.get("ok")]
        if done:
            for phase, seconds in done[-1]["seconds"].items():
                self.sync_phase.set(seconds, phase=phase)

    def render(self) -> tuple[bytes, str]:
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
