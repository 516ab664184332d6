"""Traces and metrics delivered to a real OTLP receiver; Prometheus; the status RPC; JSON logs."""

from __future__ import annotations

import json
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
from quorum_quest.server import running_server
from quorum_quest.telemetry.telemetry import LATENCY_SAMPLE_EVERY
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
            for _ in range(LATENCY_SAMPLE_EVERY):  # refreshes, so some latency is sampled
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
    assert refreshed | {"value": LATENCY_SAMPLE_EVERY} in points
    assert {"operation": "release", "result": "released", "backend": "memory", "value": 1} in points
    durations = collector.metric("quorum_quest.lock.operation.duration")
    assert any(p.count >= 1 for m in durations for p in m.histogram.data_points)
    held = collector.metric("quorum_quest.leases.held")
    assert held and all(p.as_int in (0, 1) for m in held for p in m.gauge.data_points)


async def test_prometheus_endpoint_serves_the_counters() -> None:
    port = free_port()
    settings = make_settings("memory", {}, observability={"prometheusPort": port})
    async with running_server(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = LeaderElectionStub(channel)
            await stub.try_acquire_lock(
                pb.TryAcquireLockRequest(service="s", domain=uuid.uuid4().hex, client_id="c")
            )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    assert "quorum_quest_lock_operations" in text
    assert 'result="acquired"' in text


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

    from quorum_quest.config.settings import LoggerSettings
    from quorum_quest.telemetry.logging import configure_logging

    configure_logging(LoggerSettings(format="json"))
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logger.info("inside a span")
    logger.info("outside")
    configure_logging(LoggerSettings())
    lines = [
        json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")
    ]
    inside = next(line for line in lines if line["record"]["message"] == "inside a span")
    outside = next(line for line in lines if line["record"]["message"] == "outside")
    assert inside["record"]["extra"]["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["record"]["extra"]["span_id"] == format(span.get_span_context().span_id, "016x")
    assert "trace_id" not in outside["record"]["extra"]
