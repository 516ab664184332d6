"""The grpc.aio server: lock service, health, reflection, and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from loguru import logger

from quorum_quest._rpc import SERVICE_NAME, service_handler
from quorum_quest.api.google_proto_descriptor_pool import default_google_proto_descriptor_pool
from quorum_quest.config.settings import Settings
from quorum_quest.errors import StoreUnavailable
from quorum_quest.server.runtime import Runtime, create_store
from quorum_quest.server.servicer import LeaderElectionServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Existing clients ping every 10 s even with no call in flight; accept that rather
# than answering GOAWAY "too_many_pings".
CHANNEL_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    # A port in use is an error, not a second server silently sharing it.
    ("grpc.so_reuseport", 0),
)


def bind_address(address: str) -> str:
    """Accept Go's ':5050' form as 'all interfaces'."""
    return f"[::]{address}" if address.startswith(":") else address


class LockServer:
    """One running service instance. Use `running_server()` to own its lifetime."""

    def __init__(self, runtime: Runtime, server: grpc.aio.Server, port: int) -> None:
        self.runtime = runtime
        self.port = port
        self._server = server
        self.health = health.aio.HealthServicer()

    async def set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def probe_store(self) -> None:
        """Keep health SERVING exactly while the store answers its ping."""
        interval = self.runtime.settings.server.healthInterval
        serving = True
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(interval):
                    await self.runtime.store.ping()
                ok = True
            except (StoreUnavailable, TimeoutError) as exc:
                ok = False
                if serving:
                    logger.error("store stopped answering, health is NOT_SERVING: {}", exc)
            if ok and not serving:
                logger.info("store answers again, health is SERVING")
            if ok != serving:
                serving = ok
                await self.set_health(SERVING if ok else NOT_SERVING)


@asynccontextmanager
async def running_server(settings: Settings) -> AsyncIterator[LockServer]:
    """Start the store and the server, yield it, then shut down gracefully on exit.

    Shutdown: health goes NOT_SERVING, new calls are refused, in-flight calls get
    `server.shutdownGrace` seconds, then the store is closed.
    """
    store = create_store(settings)
    await store.start()
    runtime = Runtime(settings, store)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    try:
        server.add_generic_rpc_handlers((service_handler(LeaderElectionServicer(runtime)),))
        port = server.add_insecure_port(bind_address(settings.serverAddress))
        lock_server = LockServer(runtime, server, port)
        health_pb2_grpc.add_HealthServicer_to_server(lock_server.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
            pool=default_google_proto_descriptor_pool,
        )
        await server.start()
        await lock_server.set_health(SERVING)
        logger.info(
            "serving on {} (port {}) with the {} store", settings.serverAddress, port, store.backend
        )
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lock_server.probe_store)
            try:
                yield lock_server
            finally:
                tasks.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await lock_server.health.enter_graceful_shutdown()
                    await server.stop(settings.server.shutdownGrace)
    finally:
        with anyio.CancelScope(shield=True):
            await server.stop(None)
            await store.close()
            logger.info("stopped")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_server(settings):
        await stop.wait()
        logger.info("shutting down: refusing new calls, letting in-flight calls finish")
