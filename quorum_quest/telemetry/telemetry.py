"""Traces and metrics for one observability configuration, cheap when switched off.

A `Telemetry` is built from `observability:` settings and replaced whole when a
reload changes them. What it promises an operator:

- every call is counted, and while metrics are exported every call's latency is
  recorded (no sampling: each operation's histogram count is its number of calls), in
  explicit buckets from 100 µs to 60 s (see `quorum_quest.telemetry.latency`);
- every (operation, result) pair a call can end in, and every store error series, is
  present at zero for the store in use from the start: a rate or an alert on a series
  works before its first event.

Per call the service does two things: `count()` — a dict increment, read by
observable counters only when metrics are collected — and, when metrics are exported,
one histogram record (a bisect and three additions). Spans exist only when an OTLP
endpoint is configured, and then only for the sampled share of traces.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from prometheus_client import CollectorRegistry

from quorum_quest.config.settings import ObservabilitySettings
from quorum_quest.telemetry.latency import AddsLatency, LatencyHistogram

SCOPE = "quorum_quest"

# Results of lock operations, the `result` attribute of quorum_quest.lock.operations.
ACQUIRED, HELD_BY_OTHER, RENEWED, NOT_HOLDER, RELEASED, ERROR, GRACE_PERIOD = (
    "acquired",
    "held_by_other",
    "renewed",
    "not_holder",
    "released",
    "error",
    "grace_period",
)
# GetLeader's results besides GRACE_PERIOD and ERROR; a WatchLeaders stream's.
HELD, FREE, OPENED = "held", "free", "opened"
# Calls refused for who made them: UNAUTHENTICATED or PERMISSION_DENIED, and
# RESOURCE_EXHAUSTED by a quota.
DENIED, EXHAUSTED = "denied", "quota_exceeded"

# Every result each lock operation can end in: its counters start at zero.
_REFUSED = (ERROR, DENIED, EXHAUSTED)
RESULTS: dict[str, tuple[str, ...]] = {
    "acquire": (ACQUIRED, RENEWED, HELD_BY_OTHER, GRACE_PERIOD, *_REFUSED),
    "keep_alive": (RENEWED, NOT_HOLDER, *_REFUSED),
    "keep_alive_many": (RENEWED, NOT_HOLDER, *_REFUSED),
    "release": (RELEASED, NOT_HOLDER, *_REFUSED),
    "get_leader": (HELD, FREE, GRACE_PERIOD, *_REFUSED),
    "watch": (OPENED, *_REFUSED),  # WatchLeaders: counted once, when the stream opens
}
RELOAD_RESULTS = ("applied", "rejected")

# The reload counter and the held-lease gauge read state that outlives a Telemetry.
ReloadCounts = Callable[[], dict[str, int]]
HeldLeases = Callable[[], int]
GraceLeft = Callable[[], float]


class Telemetry:
    """Tracer and instruments for one `observability:` configuration."""

    def __init__(
        self,
        settings: ObservabilitySettings,
        *,
        held_leases: HeldLeases,
        reloads: ReloadCounts,
        grace_left: GraceLeft = lambda: 0.0,
        prometheus: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self._held_leases = held_leases
        self._grace_left = grace_left
        self._reloads = reloads
        self._operations: Counter[tuple[str, str, str]] = Counter()
        self._store_errors: Counter[tuple[str, str]] = Counter()
        resource = Resource.create(
            {
                "service.name": settings.serviceName,
                "service.version": settings.serviceVersion,
                "deployment.environment": settings.environment,
            }
        )
        self._tracer_provider = self._tracing(settings, resource)
        self.tracing = self._tracer_provider is not None
        provider = self._tracer_provider or trace.NoOpTracerProvider()
        self.tracer = provider.get_tracer(SCOPE)
        self._latency = LatencyHistogram(SCOPE)
        self._meter_provider = self._metrics(settings, resource, prometheus, self._latency)
        self.metrics = self._meter_provider is not None
        meter = (self._meter_provider or NoOpMeterProvider()).get_meter(SCOPE)
        meter.create_observable_counter(
            "quorum_quest.lock.operations",
            callbacks=[self._observe_operations],
            unit="{operation}",
            description="lock operations by operation, result and backend",
        )
        meter.create_observable_counter(
            "quorum_quest.store.errors",
            callbacks=[self._observe_store_errors],
            unit="{error}",
            description="store calls that failed, by backend and operation",
        )
        meter.create_observable_counter(
            "quorum_quest.config.reloads",
            callbacks=[self._observe_reloads],
            unit="{reload}",
            description="configuration reloads by result (applied, rejected)",
        )
        meter.create_observable_gauge(
            "quorum_quest.leases.held",
            callbacks=[self._observe_held],
            unit="{lease}",
            description="live leases granted or renewed through this instance",
        )
        meter.create_observable_gauge(
            "quorum_quest.store.grace_remaining",
            callbacks=[self._observe_grace],
            unit="s",
            description="seconds left of the store's state-loss grace period (0: none)",
        )

    @staticmethod
    def _tracing(settings: ObservabilitySettings, resource: Resource) -> TracerProvider | None:
        if not settings.otelEndpoint:
            return None
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Which calls are traced is decided before a span starts, by the server's
        # `TracingInterceptor` (quorum_quest.telemetry.tracing): the spans it starts are
        # all recorded, and so are their children.
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
        exporter = OTLPSpanExporter(endpoint=settings.otelEndpoint, insecure=settings.otelInsecure)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return provider

    @staticmethod
    def _metrics(
        settings: ObservabilitySettings,
        resource: Resource,
        prometheus: CollectorRegistry | None,
        latency: LatencyHistogram,
    ) -> MeterProvider | None:
        readers: list[MetricReader] = []
        if settings.otelEndpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            class OtlpReader(AddsLatency, PeriodicExportingMetricReader):
                pass

            exporter = OTLPMetricExporter(
                endpoint=settings.otelEndpoint, insecure=settings.otelInsecure
            )
            readers.append(
                OtlpReader(exporter, export_interval_millis=settings.metricsInterval * 1000)
            )
        if prometheus is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            class PrometheusReader(AddsLatency, PrometheusMetricReader):
                pass

            readers.append(PrometheusReader(registry=prometheus))
        if not readers:
            return None
        for reader in readers:
            assert isinstance(reader, AddsLatency)
            reader.latency, reader.resource = latency, resource
        return MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)

    # -- per call ---------------------------------------------------------------------

    def count(
        self, operation: str, result: str, backend: str, started: float, locks: int = 1
    ) -> None:
        """Record a finished call that began at `started` (perf_counter) and ended
        `locks` lock operations (a batch counts each lock, its latency once per result).

        Every call's latency is recorded. (It once was 1 call in 8, by one modulo counter
        over all operations, to spare the SDK's costly record: an acquire/release loop
        then recorded only releases.)
        """
        self._operations[operation, result, backend] += locks
        if self.metrics:
            self._latency.record((operation, result, backend), time.perf_counter() - started)

    def store_error(self, operation: str, backend: str) -> None:
        self._store_errors[backend, operation] += 1

    def expect_backend(self, backend: str) -> None:
        """Put every counter series of `backend` in place at zero, before its first call."""
        for operation, results in RESULTS.items():
            for result in results:
                self._operations.setdefault((operation, result, backend), 0)
            self._store_errors.setdefault((backend, operation), 0)

    # -- read at collection time ----------------------------------------------------------

    def _observe_operations(self, options: CallbackOptions) -> Iterable[Observation]:
        for (operation, result, backend), value in list(self._operations.items()):
            yield Observation(value, {"operation": operation, "result": result, "backend": backend})

    def _observe_store_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        for (backend, operation), value in list(self._store_errors.items()):
            yield Observation(value, {"backend": backend, "operation": operation})

    def _observe_reloads(self, options: CallbackOptions) -> Iterable[Observation]:
        reloads = dict.fromkeys(RELOAD_RESULTS, 0) | self._reloads()
        for result, value in reloads.items():
            yield Observation(value, {"result": result})

    def _observe_held(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self._held_leases())

    def _observe_grace(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self._grace_left())

    def operation_counts(self) -> dict[tuple[str, str, str], int]:
        return dict(self._operations)

    def carry_counts_from(self, previous: Telemetry) -> None:
        """Keep counting from where `previous` stopped, so counters never go back."""
        self._operations.update(previous._operations)
        self._store_errors.update(previous._store_errors)
        self._latency.carry_from(previous._latency)

    def shutdown(self) -> None:
        """Flush what is buffered and stop exporting."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
