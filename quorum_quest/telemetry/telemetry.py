"""Traces and metrics for one observability configuration, cheap when switched off.

A `Telemetry` is built from `observability:` settings and replaced whole when a
reload changes them. Per call the service does two things: `count()` — a dict
increment, read by observable counters only when metrics are collected — and,
when metrics are exported, one histogram record. Spans exist only when an OTLP
endpoint is configured, and then only for the sampled share of traces.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry

from quorum_quest.config.settings import ObservabilitySettings

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
# Calls refused for who made them: UNAUTHENTICATED or PERMISSION_DENIED, and
# RESOURCE_EXHAUSTED by a quota.
DENIED, EXHAUSTED = "denied", "quota_exceeded"

LATENCY_SAMPLE_EVERY = 8

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
        self._calls = 0
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
        self._meter_provider = self._metrics(settings, resource, prometheus)
        self.metrics = self._meter_provider is not None
        meter = (self._meter_provider or NoOpMeterProvider()).get_meter(SCOPE)
        self._duration = meter.create_histogram(
            "quorum_quest.lock.operation.duration",
            unit="s",
            description="time to serve a lock operation, store call included (1 call in 8)",
        )
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

        provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.traceSampleRatio))
        )
        exporter = OTLPSpanExporter(endpoint=settings.otelEndpoint, insecure=settings.otelInsecure)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return provider

    @staticmethod
    def _metrics(
        settings: ObservabilitySettings, resource: Resource, prometheus: CollectorRegistry | None
    ) -> MeterProvider | None:
        readers: list[MetricReader] = []
        if settings.otelEndpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            exporter = OTLPMetricExporter(
                endpoint=settings.otelEndpoint, insecure=settings.otelInsecure
            )
            readers.append(
                PeriodicExportingMetricReader(
                    exporter, export_interval_millis=settings.metricsInterval * 1000
                )
            )
        if prometheus is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            readers.append(PrometheusMetricReader(registry=prometheus))
        if not readers:
            return None
        return MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)

    # -- per call ---------------------------------------------------------------------

    def count(
        self, operation: str, result: str, backend: str, started: float, locks: int = 1
    ) -> None:
        """Record a finished call that began at `started` (perf_counter) and ended
        `locks` lock operations (a batch counts each lock, its latency once).

        Every call is counted; the latency of one call in `LATENCY_SAMPLE_EVERY` is
        recorded, since a histogram record costs about as much as the rest of the
        bookkeeping together and a sample shows the same distribution.
        """
        self._operations[operation, result, backend] += locks
        if self.metrics:
            self._calls += 1
            if self._calls % LATENCY_SAMPLE_EVERY == 0:
                self._duration.record(
                    time.perf_counter() - started,
                    {"operation": operation, "result": result, "backend": backend},
                )

    def store_error(self, operation: str, backend: str) -> None:
        self._store_errors[backend, operation] += 1

    # -- read at collection time ----------------------------------------------------------

    def _observe_operations(self, options: CallbackOptions) -> Iterable[Observation]:
        for (operation, result, backend), value in list(self._operations.items()):
            yield Observation(value, {"operation": operation, "result": result, "backend": backend})

    def _observe_store_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        for (backend, operation), value in list(self._store_errors.items()):
            yield Observation(value, {"backend": backend, "operation": operation})

    def _observe_reloads(self, options: CallbackOptions) -> Iterable[Observation]:
        for result, value in self._reloads().items():
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

    def shutdown(self) -> None:
        """Flush what is buffered and stop exporting."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()


class CurrentTracer(trace.Tracer):
    """A tracer that always starts spans on the tracer of the telemetry now in force.

    The gRPC server interceptor is installed once, at start; through this tracer it
    follows every reload of the observability settings.
    """

    def __init__(self, current: Callable[[], Telemetry]) -> None:
        self._current = current

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._current().tracer.start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._current().tracer.start_as_current_span(*args, **kwargs)


class CurrentTracerProvider(trace.TracerProvider):
    def __init__(self, current: Callable[[], Telemetry]) -> None:
        self._tracer = CurrentTracer(current)

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return self._tracer
