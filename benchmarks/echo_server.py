"""The ceiling reference: a grpc.aio server that does nothing but answer.

python -m benchmarks.echo_server [--port N] [--loop uvloop|asyncio]

It serves the lock service's method paths (`/quorum.quest.api.v1.LeaderElectionService/
TryAcquireLock`, `KeepAlive`, `ReleaseLock`) through one generic handler, so the
harness drives it with the same stub and load loop as the service. Requests are
not decoded; every answer is a response serialized once at start from the service's
own message classes, of the size the service sends for a granted acquire, a renewed
lease and a released lock (so the client decodes what it decodes from the service).
What separates the service from this server is then everything the service does
per call: decoding, validation, the store round trip, logging and metrics.

It runs on uvloop where installed, as the service does by default (`server.uvloop`).
Listens on 127.0.0.1:<port> (0 = a free port), prints `ready <port>` on stdout once
serving, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc

from quorum_quest._rpc import SERVICE_NAME, pb

# Like the harness's ids ("<target>-<scenario>-<clients>-<8 hex>-client-<i>") and the
# stores' fencing tokens (they start at the wall clock in microseconds): the same
# encoded sizes as the service's answers, 53, 13 and 2 bytes.
CLIENT_ID = "redis-distinct-50-0123abcd-client-17"
TOKEN = 1_790_000_000_000_000
LEASE = timedelta(milliseconds=10_000)  # the harness's TTL_MS

RESPONSES: dict[str, bytes] = {
    "TryAcquireLock": pb.TryAcquireLockResponse(
        is_leader=True, fencing_token=TOKEN, lease_length=LEASE, leader_id=CLIENT_ID
    ).SerializeToString(),
    "KeepAlive": pb.KeepAliveResponse(lease_length=LEASE, fencing_token=TOKEN).SerializeToString(),
    "ReleaseLock": pb.ReleaseLockResponse(released=True).SerializeToString(),
}


def answer(response: bytes) -> Callable[[bytes, Any], Awaitable[bytes]]:
    async def handle(request: bytes, context: Any) -> bytes:
        return response

    return handle


def echo_handler() -> grpc.GenericRpcHandler:
    """Raw bytes in and out: no (de)serializer, so nothing is decoded or encoded per call."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(answer(response))
        for name, response in RESPONSES.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


async def serve(port: int) -> None:
    # The service's server options; imported here, as the harness imports this module
    # for `RESPONSES` and needs none of the service's imports.
    from quorum_quest.server.app import channel_options

    server = grpc.aio.server(options=channel_options(reuse_port=False))
    server.add_generic_rpc_handlers((echo_handler(),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {bound}", flush=True)
    await stop.wait()
    await server.stop(grace=1)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return None
        return uvloop.new_event_loop
    return None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.echo_server")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
