"""Which calls the server traces, and the span a traced call gets."""

from __future__ import annotations

import types
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace import StatusCode as SpanStatus

from quorum_quest.telemetry.tracing import TracedService

METHOD = "/quorum.quest.api.v1.LeaderElectionService/TryAcquireLock"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
NOT_SAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-00"


class Context:
    """The part of a grpc.aio servicer context the tracing reads."""

    def __init__(self, *metadata: tuple[str, str], code: grpc.StatusCode | None = None) -> None:
        self._metadata = metadata
        self._code = code

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return "no such lock" if self._code else ""


async def answer(request: Any, context: Any) -> str:
    return "answer"


def traced_by(ratio: float, exporter: InMemorySpanExporter) -> Any:
    """The handler of METHOD, as `TracedService` serves it, under `ratio`."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = types.SimpleNamespace(
        tracing=True,
        tracer=provider.get_tracer("test"),
        settings=types.SimpleNamespace(traceSampleRatio=ratio),
    )
    service, _, name = METHOD[1:].rpartition("/")
    handlers = {name: grpc.unary_unary_rpc_method_handler(answer)}
    traced = TracedService(
        grpc.method_handlers_generic_handler(service, handlers),
        lambda: telemetry,  # type: ignore[arg-type, return-value]
    )
    return traced.service(types.SimpleNamespace(method=METHOD))  # type: ignore[arg-type]


async def test_a_call_without_a_parent_is_not_traced_at_ratio_zero() -> None:
    exporter = InMemorySpanExporter()
    assert await traced_by(0.0, exporter).unary_unary("request", Context()) == "answer"
    assert exporter.get_finished_spans() == ()


async def test_a_call_whose_caller_did_not_sample_is_not_traced_even_at_ratio_one() -> None:
    exporter = InMemorySpanExporter()
    handler = traced_by(1.0, exporter)
    assert await handler.unary_unary("request", Context(("traceparent", NOT_SAMPLED)))
    assert exporter.get_finished_spans() == ()


async def test_a_call_whose_caller_sampled_continues_its_trace_at_ratio_zero() -> None:
    exporter = InMemorySpanExporter()
    handler = traced_by(0.0, exporter)
    assert await handler.unary_unary("request", Context(("traceparent", SAMPLED))) == "answer"
    [span] = exporter.get_finished_spans()
    assert span.name == METHOD and span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.attributes == {
        "rpc.system": "grpc",
        "rpc.service": "quorum.quest.api.v1.LeaderElectionService",
        "rpc.method": "TryAcquireLock",
        "rpc.grpc.status_code": 0,
    }
    assert span.status.status_code is SpanStatus.UNSET


async def test_a_new_root_trace_at_ratio_one_and_a_failed_call_has_an_error_status() -> None:
    exporter = InMemorySpanExporter()
    await traced_by(1.0, exporter).unary_unary("request", Context(code=grpc.StatusCode.NOT_FOUND))
    [span] = exporter.get_finished_spans()
    assert span.parent is None
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 5
    assert span.status.status_code is SpanStatus.ERROR
    assert span.status.description == "NOT_FOUND: no such lock"


async def changes(request: Any, context: Any) -> Any:
    for change in ("current", "granted"):
        yield change


async def test_a_traced_stream_yields_every_response_inside_its_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = types.SimpleNamespace(
        tracing=True,
        tracer=provider.get_tracer("test"),
        settings=types.SimpleNamespace(traceSampleRatio=1.0),
    )
    service = "quorum.quest.api.v1.LeaderElectionService"
    handlers = {"WatchLeaders": grpc.unary_stream_rpc_method_handler(changes)}
    traced = TracedService(
        grpc.method_handlers_generic_handler(service, handlers),
        lambda: telemetry,  # type: ignore[arg-type, return-value]
    )
    method = f"/{service}/WatchLeaders"
    handler = traced.service(types.SimpleNamespace(method=method))  # type: ignore[arg-type]
    assert [change async for change in handler.unary_stream("request", Context())] == [
        "current",
        "granted",
    ]
    [span] = exporter.get_finished_spans()
    assert span.name == method and span.kind is SpanKind.SERVER
