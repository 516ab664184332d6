"""Traces and metrics delivered to a real OTLP receiver; Prometheus; the status RPC; JSON logs."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from quorum_quest import QuorumQuestClient
from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.config.settings import LoggerSettings
from quorum_quest.server import running_server
from quorum_quest.telemetry.latency import LATENCY_BUCKETS_S
from quorum_quest.telemetry.logging import configure_logging
from tests.backends import free_port
from tests.conftest import make_settings


class OtlpReceiver(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """The collector's two OTLP/gRPC services, keeping what they receive."""

    def __init__(self) -> None:
        self.spans: list = []
        self.resources: list = []
        self.metrics: list = []

    async def Export(self, request, context):  # noqa: N802 - the proto's name
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for resource_spans in request.resource_spans:
                self.resources.append(resource_spans.resource)
                for scope in resource_spans.scope_spans:
                    self.spans.extend(scope.spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource_metrics in request.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                self.metrics.extend(scope.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def metric(self, name: str):
        return [m for m in self.metrics if m.name == name]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[OtlpReceiver, str]]:
    collector = OtlpReceiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collector, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture(scope="module")
def client_spans() -> InMemorySpanExporter:
    """The application's own OpenTelemetry set-up, as a user of the SDK would have it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


DURATION = "quorum_quest.lock.operation.duration"
REFRESHES = 3


def attributes(span_or_point) -> dict[str, object]:
    return {
        kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span_or_point.attributes
    }


async def test_acquire_delivers_linked_spans_and_counters(receiver, client_spans) -> None:
    collector, endpoint = receiver
    observability = {
        "otelEndpoint": endpoint,
        "traceSampleRatio": 1.0,
        "metricsInterval": 0.2,
        "serviceName": "qq-test",
        "environment": "ci",
    }
    settings = make_settings("memory", {}, observability=observability)
    async with running_server(settings) as server:
        client = QuorumQuestClient("svc", uuid.uuid4().hex, 5, f"127.0.0.1:{server.port}")
        async with client:
            assert await client.try_acquire_lock()
            for _ in range(REFRESHES):
                assert await client.try_acquire_lock()
    # Stopping the server flushed its spans and metrics.
    client_span = next(s for s in client_spans.get_finished_spans() if "TryAcquireLock" in s.name)
    server_span = next(s for s in collector.spans if s.name.endswith("/TryAcquireLock"))
    store_span = next(s for s in collector.spans if s.name == "store acquire")
    assert server_span.trace_id == client_span.context.trace_id.to_bytes(16, "big")
    assert server_span.parent_span_id == client_span.context.span_id.to_bytes(8, "big")
    assert store_span.trace_id == server_span.trace_id
    assert store_span.parent_span_id == server_span.span_id
    assert attributes(store_span) == {
        "quorum_quest.backend": "memory",
        "quorum_quest.operation": "acquire",
    }
    resource = attributes(collector.resources[0])
    assert resource["service.name"] == "qq-test"
    assert resource["deployment.environment"] == "ci"

    operations = collector.metric("quorum_quest.lock.operations")
    points = [attributes(p) | {"value": p.as_int} for m in operations for p in m.sum.data_points]
    assert {"operation": "acquire", "result": "acquired", "backend": "memory", "value": 1} in points
    refreshed = {"operation": "acquire", "result": "renewed", "backend": "memory"}
    assert refreshed | {"value": REFRESHES} in points
    assert {"operation": "release", "result": "released", "backend": "memory", "value": 1} in points
    # Present from the start, so at zero in the last export: a result no call had.
    assert {"operation": "acquire", "result": "held_by_other", "backend": "memory", "value": 0} in (
        points
    )
    # Every call's latency, in buckets of seconds (cumulative: the last export has all).
    durations = [p for m in collector.metric(DURATION) for p in m.histogram.data_points]
    assert all(list(p.explicit_bounds) == list(LATENCY_BUCKETS_S) for p in durations)
    counts: dict[str, int] = {}
    for point in durations:
        result = str(attributes(point)["result"])
        counts[result] = max(counts.get(result, 0), point.count)
    assert counts == {"acquired": 1, "renewed": REFRESHES, "released": 1}
    held = collector.metric("quorum_quest.leases.held")
    assert held and all(p.as_int in (0, 1) for m in held for p in m.gauge.data_points)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return answer.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`, or None."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
            if labels.items() <= found.items():
                return float(line.rsplit(" ", 1)[1])
    return None


async def test_prometheus_counters_are_at_zero_before_the_first_call() -> None:
    port = free_port()
    settings = make_settings("memory", {}, observability={"prometheusPort": port})
    async with running_server(settings):
        text = scrape(port)
    total = "quorum_quest_lock_operations_total"
    assert sample(text, total, operation="acquire", result="acquired", backend="memory") == 0.0
    assert sample(text, total, operation="release", result="released", backend="memory") == 0.0
    assert sample(text, "quorum_quest_store_errors_total", operation="acquire") == 0.0
    assert sample(text, "quorum_quest_config_reloads_total", result="rejected") == 0.0


async def test_prometheus_histogram_has_second_buckets_for_both_operations_of_a_loop() -> None:
    port = free_port()
    settings = make_settings("memory", {}, observability={"prometheusPort": port})
    loops = 10
    async with running_server(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = LeaderElectionStub(channel)
            domain = uuid.uuid4().hex
            for _ in range(loops):
                await stub.try_acquire_lock(
                    pb.TryAcquireLockRequest(service="s", domain=domain, client_id="c")
                )
                await stub.release_lock(
                    pb.ReleaseLockRequest(service="s", domain=domain, client_id="c")
                )
        text = scrape(port)
    total = "quorum_quest_lock_operations_total"
    assert sample(text, total, operation="acquire", result="acquired") == loops
    histogram = "quorum_quest_lock_operation_duration_seconds"
    assert sample(text, f"{histogram}_count", operation="acquire", result="acquired") == loops
    assert sample(text, f"{histogram}_count", operation="release", result="released") == loops
    bounds = [
        re.search(r'le="([^"]+)"', line)[1]  # type: ignore[index]
        for line in text.splitlines()
        if line.startswith(f"{histogram}_bucket{{") and 'operation="release"' in line
    ]
    assert bounds == [*(repr(bound) for bound in LATENCY_BUCKETS_S), "+Inf"]


async def test_status_reports_version_backend_uptime_and_held_leases(
    address: str, backend: str
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = LeaderElectionStub(channel)
        await stub.try_acquire_lock(
            pb.TryAcquireLockRequest(service="s", domain=uuid.uuid4().hex, client_id="c", ttl=30)
        )
        status = await stub.get_status(pb.GetStatusRequest())
    assert status.version
    assert status.backend == backend
    assert status.uptime.total_seconds() > 0
    assert status.held_leases == 1
    assert status.store_reachable
    assert status.last_reload == ""


def test_json_log_lines_carry_trace_and_span_ids(capfd: pytest.CaptureFixture[str]) -> None:
    from loguru import logger

    configure_logging(LoggerSettings(format="json"))
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logger.info("inside a span")
    logger.info("outside")
    configure_logging(LoggerSettings())
    lines = [
        json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")
    ]
    inside = next(line for line in lines if line["message"] == "inside a span")
    outside = next(line for line in lines if line["message"] == "outside")
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(span.get_span_context().span_id, "016x")
    assert "trace_id" not in outside and "record" not in outside


async def test_a_traced_call_logs_a_flat_json_line_naming_its_lock_and_trace(
    receiver, client_spans, capfd: pytest.CaptureFixture[str]
) -> None:
    collector, endpoint = receiver
    observability = {"otelEndpoint": endpoint, "traceSampleRatio": 1.0}
    settings = make_settings("memory", {}, observability=observability)
    domain = uuid.uuid4().hex
    configure_logging(LoggerSettings(format="json", level="DEBUG"))
    try:
        async with running_server(settings) as server:
            client = QuorumQuestClient("svc", domain, 5, f"127.0.0.1:{server.port}")
            async with client:
                assert await client.try_acquire_lock()
            # A library's stdlib record, in the server's process: the same stream.
            logging.getLogger("quorum_quest.client").warning("a library speaks")
    finally:
        configure_logging(LoggerSettings())
    lines = [
        json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")
    ]
    acquired = next(line for line in lines if line["message"].startswith("lock acquired"))
    assert {"service", "domain", "client_id", "trace_id", "span_id"} <= acquired.keys()
    assert list(acquired)[:4] == ["time", "level", "message", "logger"]
    assert (acquired["level"], acquired["service"], acquired["domain"]) == ("DEBUG", "svc", domain)
    assert acquired["logger"] == "quorum_quest.server.servicer"
    # The line's trace is the caller's: the SDK's client span started it.
    assert any(
        "TryAcquireLock" in span.name and span.context.trace_id == int(acquired["trace_id"], 16)
        for span in client_spans.get_finished_spans()
    )
    stdlib = next(line for line in lines if line["message"] == "a library speaks")
    assert stdlib["logger"] == "quorum_quest.client" and stdlib["level"] == "WARNING"
