"""A tiny OTLP/gRPC receiver for the `+obs` targets: it accepts and counts, nothing else.

python -m benchmarks.otlp_sink [--port N]

Implements the collector's TraceService and MetricsService, answers every Export
with an empty response and counts what came in. Listens on 127.0.0.1:<port> (0 = a
free port) and prints `ready <port>` on stdout once serving. On SIGTERM (or SIGINT)
it stops and prints one line `otlp-sink counts: {json}` on stderr. The harness runs
it as its own process, so receiving does not take time from the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import Counter
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

COUNTS_PREFIX = "otlp-sink counts: "


class Sink(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """Both services on one object: both generated servicers name their method `Export`."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    async def Export(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.counts["trace_exports"] += 1
            self.counts["spans"] += sum(
                len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
            )
            return trace_service_pb2.ExportTraceServiceResponse()
        self.counts["metric_exports"] += 1
        self.counts["metric_points"] += sum(
            len(getattr(metric, metric.WhichOneof("data")).data_points)
            for rm in request.resource_metrics
            for scope in rm.scope_metrics
            for metric in scope.metrics
            if metric.WhichOneof("data")
        )
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def serve(port: int) -> dict[str, int]:
    sink = Sink()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(sink, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {bound}", flush=True)
    await stop.wait()
    await server.stop(grace=1)
    return {"spans": 0, "metric_points": 0, **sink.counts}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.otlp_sink")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    counts = asyncio.run(serve(parser.parse_args().port))
    print(COUNTS_PREFIX + json.dumps(counts), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
