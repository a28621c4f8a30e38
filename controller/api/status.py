"""The cluster as scripts see it: /v1/status JSON and /metrics in Prometheus format."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kowalski.common.messages import Metrics
from kowalski.controller import circuit as breaker
from kowalski.controller.fleet.device_table import DeviceTable, Sample
from kowalski.controller.fleet.dispatch import JobCounters
from kowalski.controller.fleet.selection import exclusion_reason, score
from kowalski.controller.models.router import EndpointView
from kowalski.controller.rlm.live import LiveRunSummary
from kowalski.controller.scoring import OPERATIONS


class DeviceStatus(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    name: str
    url: str
    source: str
    health: str
    lost: bool
    # Why the device would not take a Python job now, or None.
    excluded: str | None
    scores: dict[str, float]
    latency_ms: float | None
    metrics: Metrics | None
    languages: list[str]
    sandbox_mode: str
    in_flight: list[str]
    circuit: str
    seconds_since_heartbeat: float | None
    last_error: str
    history: list[Sample]


class Status(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    time: float
    devices: list[DeviceStatus]
    endpoints: list[EndpointView]
    jobs: JobCounters
    runs: list[LiveRunSummary]
    cache: dict[str, int]


def device_statuses(table: DeviceTable, now: float) -> list[DeviceStatus]:
    settings = table.settings
    rows = []
    for row in sorted(table.devices.values(), key=lambda r: r.device_id):
        rows.append(DeviceStatus(
            device_id=row.device_id, name=row.name, url=row.url, source=row.source,
            health=row.health, lost=row.lost,
            excluded=exclusion_reason(row, settings, language="python", now=now),
            scores={op: round(score(row, op, load_penalty=settings.load_penalty), 4)
                    for op in OPERATIONS},
            latency_ms=row.latency_ms, metrics=row.metrics, languages=list(row.languages),
            sandbox_mode=row.sandbox_mode, in_flight=sorted(row.in_flight),
            circuit=breaker.phase(row.circuit, now, settings.circuit),
            seconds_since_heartbeat=(None if row.last_heartbeat_at is None
                                     else round(now - row.last_heartbeat_at, 3)),
            last_error=row.last_error, history=list(row.history),
        ))
    return rows


class StatusCollector(Collector):
    """Reads the latest Status at scrape time."""

    def __init__(self, snapshot: Callable[[], Status]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        status = self._snapshot()
        up = GaugeMetricFamily("kowalski_device_up", "1 if the agent is healthy",
                               labels=["device"])
        memory = GaugeMetricFamily("kowalski_device_memory_available_bytes",
                                   "Memory available on the agent's host", labels=["device"])
        cpu = GaugeMetricFamily("kowalski_device_cpu_percent", "CPU use of the agent's host",
                                labels=["device"])
        latency = GaugeMetricFamily("kowalski_device_latency_ms", "Heartbeat round trip (EWMA)",
                                    labels=["device"])
        in_flight = GaugeMetricFamily("kowalski_device_jobs_in_flight", "Jobs sent, not done",
                                      labels=["device"])
        circuit = GaugeMetricFamily("kowalski_device_circuit_open",
                                    "1 while the agent's circuit is open (no work sent)",
                                    labels=["device"])
        for device in status.devices:
            labels = [device.device_id]
            up.add_metric(labels, 1.0 if device.health == "healthy" else 0.0)
            circuit.add_metric(labels, 1.0 if device.circuit == "open" else 0.0)
            in_flight.add_metric(labels, len(device.in_flight))
            if device.metrics is not None:
                memory.add_metric(labels, device.metrics.memory_available_bytes)
                cpu.add_metric(labels, device.metrics.cpu_percent)
            if device.latency_ms is not None:
                latency.add_metric(labels, device.latency_ms)
        yield from (up, memory, cpu, latency, in_flight, circuit)
        endpoint_up = GaugeMetricFamily("kowalski_exo_endpoint_up", "1 if exo answers",
                                        labels=["endpoint"])
        endpoint_circuit = GaugeMetricFamily(
            "kowalski_exo_endpoint_circuit_open",
            "1 while the endpoint's circuit is open (no calls sent)", labels=["endpoint"])
        requests = CounterMetricFamily("kowalski_exo_requests", "Model calls sent",
                                       labels=["endpoint"])
        tokens = CounterMetricFamily("kowalski_exo_tokens", "Tokens used",
                                     labels=["endpoint", "kind"])
        for endpoint in status.endpoints:
            endpoint_up.add_metric([endpoint.url], 1.0 if endpoint.healthy else 0.0)
            endpoint_circuit.add_metric([endpoint.url], 1.0 if endpoint.circuit == "open" else 0.0)
            requests.add_metric([endpoint.url], endpoint.requests)
            tokens.add_metric([endpoint.url, "prompt"], endpoint.prompt_tokens)
            tokens.add_metric([endpoint.url, "completion"], endpoint.completion_tokens)
        yield from (endpoint_up, endpoint_circuit, requests, tokens)
        jobs = CounterMetricFamily("kowalski_jobs", "Code jobs by outcome", labels=["outcome"])
        for outcome in ("submitted", "succeeded", "failed", "rerouted", "busy"):
            jobs.add_metric([outcome], getattr(status.jobs, outcome))
        yield jobs
        cache = CounterMetricFamily("kowalski_cache", "Model call cache", labels=["kind"])
        for kind, value in status.cache.items():
            cache.add_metric([kind], value)
        yield cache
        yield GaugeMetricFamily("kowalski_rlm_runs_active", "RLM runs under way",
                                value=sum(1 for r in status.runs if r.status == "running"))
        runs = GaugeMetricFamily("kowalski_rlm_runs", "Runs the controller holds (the recent "
                                 "finished ones and those under way) by status",
                                 labels=["status"])
        for run_status in ("running", "finished", "failed"):
            runs.add_metric([run_status], sum(1 for r in status.runs if r.status == run_status))
        yield runs


def prometheus_text(snapshot: Callable[[], Status]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(snapshot))
    return generate_latest(registry)
