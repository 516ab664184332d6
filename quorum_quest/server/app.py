"""The grpc.aio server: lock service, health, reflection, and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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
    """One service instance: the grpc.aio server, its health service and its store probe.

    `start()` connects the store and begins serving; `stop()` shuts down gracefully:
    health goes NOT_SERVING, new calls are refused, in-flight calls get
    `server.shutdownGrace` seconds, then the store is closed. The store probe task
    belongs to the server and ends with it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime = Runtime(settings, create_store(settings))
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server = grpc.aio.server(options=CHANNEL_OPTIONS)
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        store = self.runtime.store
        await store.start()
        try:
            self._server.add_generic_rpc_handlers(
                (service_handler(LeaderElectionServicer(self.runtime)),)
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                self._server,
                pool=default_google_proto_descriptor_pool,
            )
            self.port = self._server.add_insecure_port(bind_address(self.settings.serverAddress))
            await self._server.start()
        except BaseException:
            await store.close()
            raise
        await self._set_health(SERVING)
        self._probe = asyncio.get_running_loop().create_task(self._probe_store())
        logger.info(
            "serving on {} (port {}) with the {} store",
            self.settings.serverAddress,
            self.port,
            store.backend,
        )

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.settings.server.shutdownGrace)
        await self.runtime.store.close()
        logger.info("stopped")

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _probe_store(self) -> None:
        """Keep health SERVING exactly while the store answers its ping."""
        interval = self.settings.server.healthInterval
        serving = True
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(interval):
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
                await self._set_health(SERVING if ok else NOT_SERVING)


@asynccontextmanager
async def running_server(settings: Settings) -> AsyncIterator[LockServer]:
    """A started `LockServer`, stopped gracefully when the block exits."""
    server = LockServer(settings)
    await server.start()
    try:
        yield server
    finally:
        await asyncio.shield(server.stop())


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_server(settings):
        await stop.wait()
        logger.info("shutting down: refusing new calls, letting in-flight calls finish")
