"""The grpc.aio server: lock service, health, reflection, and graceful shutdown.

With `server.tls` the port speaks TLS (mTLS with a client CA) and its certificate files
are re-read when they change; with auth on (`Settings.auth_on`) every call of the lock
service is identified and authorized (`access`). Health stays open to every caller, so
probes need no credentials; reflection can be switched off (`server.reflection`).
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from loguru import logger
from prometheus_client import CollectorRegistry, start_http_server

from quorum_quest._rpc import SERVICE_NAME, DecodingRegistrar, service_handler
from quorum_quest.api.google_proto_descriptor_pool import default_google_proto_descriptor_pool
from quorum_quest.config.settings import Settings, split_address
from quorum_quest.config.watch import watch_settings
from quorum_quest.errors import ConfigError, StoreUnavailable
from quorum_quest.server.access import Access
from quorum_quest.server.identity import TokenBook, Tokens
from quorum_quest.server.runtime import LeaseBook, Runtime, Snapshot, create_store
from quorum_quest.server.servicer import LeaderElectionServicer
from quorum_quest.server.tls import ServerCertificates, load_certificates
from quorum_quest.stores import LockStore
from quorum_quest.telemetry.logging import ThrottledLog, configure_logging
from quorum_quest.telemetry.telemetry import Telemetry
from quorum_quest.telemetry.tracing import TracedService

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Seconds between checks of the certificate and tokens files for a change.
SECRETS_POLL_S = 1.0

# Existing clients ping every 10 s even with no call in flight; accept that rather
# than answering GOAWAY "too_many_pings".
CHANNEL_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)


def channel_options(reuse_port: bool) -> tuple[tuple[str, int], ...]:
    """Server options. Only workers share a port: otherwise a port in use is an error,
    not a second server silently sharing it."""
    return (*CHANNEL_OPTIONS, ("grpc.so_reuseport", int(reuse_port)))


def check_files(settings: Settings) -> None:
    """Read and check every file the configuration names besides itself (certificates,
    keys, the tokens file), as the server will: a `ConfigError` naming the key when one
    cannot be used, so the command exits 2 before anything starts."""
    if settings.server.tls.enabled:
        load_certificates(settings.server.tls)
    if settings.auth.tokensFile:
        TokenBook.load(settings.auth.tokensFile, warn=False)


def bind_address(address: str) -> str:
    """Accept Go's ':5050' form as 'all interfaces'."""
    return f"[::]{address}" if address.startswith(":") else address


class CannotListen(OSError):
    """An address the service was configured to listen on cannot be bound; the message
    names the key, the address and why (in use, not of this machine, not permitted)."""


_WHY_NOT = {
    errno.EADDRINUSE: "address already in use (another process listens on it)",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "permission denied (a port below 1024 needs privileges)",
}


def cannot_listen(key: str, address: str, exc: OSError) -> CannotListen:
    if isinstance(exc, socket.gaierror):
        why = f"cannot resolve its host: {exc.strerror}"
    else:
        why = _WHY_NOT.get(exc.errno or 0) or exc.strerror or str(exc)
    return CannotListen(f"{key} {address}: {why}")


def check_address_free(address: str, *, reuse_port: bool = False) -> None:
    """Raise `CannotListen` when `address` (`serverAddress`) cannot be bound, before
    grpc tries: grpc reports that with a line of its core's log and an exception that
    names no reason. Each address the host resolves to is bound on its own, with the
    options grpc binds with (SO_REUSEADDR, and SO_REUSEPORT for workers, which share
    the port), then closed. An address family the machine lacks is no error while
    another address of the host binds, as grpc serves on those it can bind."""
    host, port = split_address(address)
    if port == 0:
        return  # any free port
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise cannot_listen("serverAddress", address, exc) from None
    failures: list[OSError] = []
    for family, kind, proto, _, where in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind(where)
        except OSError as exc:
            failures.append(exc)
    in_use = [exc for exc in failures if exc.errno in (errno.EADDRINUSE, errno.EACCES)]
    if in_use or (failures and len(failures) == len(infos)):
        raise cannot_listen("serverAddress", address, (in_use or failures)[0])


# Server reflection as grpcio-reflection ships it (v1alpha) and as current tools ask for
# it first (v1, the same messages under another package).
REFLECTION_V1 = "grpc.reflection.v1"
REFLECTION_SERVICES = (reflection.SERVICE_NAME, f"{REFLECTION_V1}.ServerReflection")


def add_reflection(server: grpc.aio.Server | DecodingRegistrar) -> None:
    """Serve reflection of the lock service and health under both reflection names.

    grpcio-reflection has no v1 servicer; v1's `.proto` is v1alpha's with another
    package name, field for field, so one servicer answers both on the wire."""
    servicer = reflection.aio.ReflectionServicer(
        (SERVICE_NAME, health.SERVICE_NAME, *REFLECTION_SERVICES), pool=_reflection_pool()
    )
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for name in REFLECTION_SERVICES:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """The `.proto` files reflection describes: the lock service's (from the private pool
    its messages live in), health's and reflection's, v1alpha and v1."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        for dependency in file.dependencies:
            add(dependency)
        if file.name not in added:
            added.add(file.name)
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            pool.Add(proto)

    add(default_google_proto_descriptor_pool.FindServiceByName(SERVICE_NAME).file)
    add(health_pb2.DESCRIPTOR)
    add(reflection_pb2.DESCRIPTOR)
    v1 = _moved(reflection_pb2.DESCRIPTOR, "grpc/reflection/v1/reflection.proto", REFLECTION_V1)
    pool.Add(v1)
    return pool


def _moved(file: FileDescriptor, name: str, package: str) -> descriptor_pb2.FileDescriptorProto:
    """`file`, a `.proto` without dependencies, as file `name` of `package`."""
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    old_prefix, new_prefix = f".{proto.package}.", f".{package}."
    proto.name = name
    proto.package = package
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old_prefix):
                field.type_name = new_prefix + field.type_name.removeprefix(old_prefix)
    for service in proto.service:
        for method in service.method:
            method.input_type = new_prefix + method.input_type.removeprefix(old_prefix)
            method.output_type = new_prefix + method.output_type.removeprefix(old_prefix)
    return proto


class HealthServicer(health.aio.HealthServicer):
    """grpc's health servicer, answering `List` UNIMPLEMENTED without a traceback.

    The stock one inherits the generated stub's `List`, which raises NotImplementedError
    in a worker thread: grpc then logs an ERROR with a traceback for every such call.
    """

    async def List(  # the proto's name
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "health List is not served; use Check")
        raise AssertionError("unreachable: context.abort raises")


class LockServer:
    """One service instance: the grpc.aio server, health, store probe and config watch.

    `start()` connects the store and begins serving; `stop()` shuts down gracefully:
    health goes NOT_SERVING, new calls are refused, in-flight calls get
    `server.shutdownGrace` seconds, then the store is closed. The store probe and
    the config watch are tasks the server owns; they end with it, as does the task that
    writes the counts of repeated log lines (`repeats`: store failures, bad requests).
    """

    def __init__(
        self, settings: Settings, config_file: Path | None = None, *, reuse_port: bool = False
    ) -> None:
        self.config_file = config_file
        self.health = HealthServicer()
        self.repeats = ThrottledLog()
        self.port = 0
        # The files are read first: one that cannot be used is a ConfigError (exit 2).
        tls = settings.server.tls
        self.certificates = ServerCertificates(tls) if tls.enabled else None
        tokens = Tokens(settings.auth.tokensFile) if settings.auth.tokensFile else None
        self._prometheus = CollectorRegistry() if settings.observability.prometheusPort else None
        self._metrics_server: Any = None
        self.runtime = Runtime(
            Snapshot(settings, create_store(settings), self._telemetry(settings)),
            LeaseBook(),
            started=time.monotonic(),
        )
        self.runtime.current.access = self._access(settings, tokens)
        self.runtime.current.store.notify_releases(self.runtime.releases.released)
        self._reuse_port = reuse_port
        self._server = grpc.aio.server(options=channel_options(reuse_port))
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def settings(self) -> Settings:
        return self.runtime.current.settings

    @property
    def mutual_tls(self) -> bool:
        """Clients must present a certificate: fixed when the port is bound."""
        return self.certificates is not None and self.certificates.tls.mutual

    def _access(self, settings: Settings, tokens: Tokens | None) -> Access | None:
        """Auth for `settings`, or None while it is off. The client CA in force is the one
        the port was bound with (a change of `server.tls` needs a restart)."""
        if not (settings.auth.tokensFile or settings.auth.rules or self.mutual_tls):
            return None
        return Access(settings.auth, tokens, mutual_tls=self.mutual_tls, quotas=self.runtime.quotas)

    def _tokens_for(self, settings: Settings) -> Tokens | None:
        """The tokens of `settings`: those in force when the file is the same, else the
        new file read now (a `ConfigError` when it cannot be used)."""
        path = settings.auth.tokensFile
        if not path:
            return None
        access = self.runtime.current.access
        if access is not None and access.tokens is not None and access.tokens.path == path:
            return access.tokens
        return Tokens(path)

    def _telemetry(self, settings: Settings) -> Telemetry:
        return Telemetry(
            settings.observability,
            held_leases=lambda: len(self.runtime.leases),
            reloads=lambda: dict(self.runtime.reloads),
            grace_left=lambda: self.runtime.grace_left_ms() / 1000,
            prometheus=self._prometheus,
        )

    async def start(self) -> None:
        """Bind, connect the store and serve. An address that cannot be bound is a
        `CannotListen` and a store that cannot be reached a `StoreUnavailable`; either
        way nothing is left running."""
        address = bind_address(self.settings.serverAddress)
        check_address_free(self.settings.serverAddress, reuse_port=self._reuse_port)
        store = self.runtime.current.store
        await store.start()
        try:
            self.runtime.note_grace(await store.check_state())
            servicer = LeaderElectionServicer(self.runtime, self.repeats)
            service = service_handler(servicer, self._refused)
            # Traced only when traces are exported from the start; then every reload of
            # the observability settings applies (see quorum_quest.telemetry.tracing).
            if self.settings.observability.otelEndpoint:
                service = TracedService(service, lambda: self.runtime.current.telemetry)
            self._server.add_generic_rpc_handlers((service,))
            # The stock servicers register through a stand-in that makes their handlers
            # refuse undecodable requests too (INVALID_ARGUMENT, not UNKNOWN + traceback).
            registrar = DecodingRegistrar(self._server, self._refused)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
            if self.settings.server.reflection:
                add_reflection(registrar)
            try:
                if self.certificates is None:
                    self.port = self._server.add_insecure_port(address)
                else:
                    credentials = self.certificates.credentials()
                    self.port = self._server.add_secure_port(address, credentials)
            except RuntimeError:  # bound since the check; grpc's core has logged why
                raise CannotListen(
                    f"serverAddress {self.settings.serverAddress}: grpc could not bind it"
                ) from None
            await self._server.start()
            if self._prometheus is not None:
                observability = self.settings.observability
                host = observability.prometheus_host(self.settings.serverAddress)
                try:
                    self._metrics_server, _ = start_http_server(
                        observability.prometheusPort, addr=host, registry=self._prometheus
                    )
                except OSError as exc:
                    where = f"{host}:{observability.prometheusPort}"
                    raise cannot_listen("observability.prometheusPort", where, exc) from None
                logger.info("Prometheus metrics on {}:{}", host, observability.prometheusPort)
        except BaseException:
            await self._server.stop(None)
            await store.close()
            raise
        await self._set_health(SERVING)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._probe_store()))
        self._tasks.append(loop.create_task(self._summarise_repeats()))
        if self.config_file is not None:
            self._tasks.append(loop.create_task(self._watch_config(self.config_file)))
        self._tasks.append(loop.create_task(self._watch_secrets()))
        self._describe_security()
        logger.info(
            "serving on {} (port {}{}) with the {} store",
            self.settings.serverAddress,
            self.port,
            ", TLS" if self.certificates is not None else "",
            store.backend,
        )

    def _describe_security(self) -> None:
        """Say at start what protects the port, and what does not."""
        settings = self.settings
        if self.certificates is not None:
            logger.info(
                "TLS on: serving {} (valid until {:%Y-%m-%d %H:%M} UTC){}",
                self.certificates.material.subject,
                self.certificates.material.not_after,
                "; clients need a certificate signed by " + settings.server.tls.clientCaFile
                if self.mutual_tls
                else "",
            )
        access = self.runtime.current.access
        if access is None:
            return
        tokens = access.tokens
        logger.info(
            "auth on: {} rules, {} token identities{}, lease quota {}, call quota {}",
            len(settings.auth.rules),
            len(tokens.book) if tokens is not None else 0,
            ", client certificates" if self.mutual_tls else "",
            access.max_leases or "none",
            f"{access.calls_per_second:g}/s" if access.calls_per_second else "none",
        )
        _warn_about_auth(settings, tls=self.certificates is not None)

    async def _watch_secrets(self) -> None:
        """Re-read the certificate and tokens files when they change, until the server
        stops (each poll costs a few stat calls)."""
        while True:
            await asyncio.sleep(SECRETS_POLL_S)
            access = self.runtime.current.access
            tokens = access.tokens if access is not None else None
            try:
                if self.certificates is not None:
                    await asyncio.to_thread(self.certificates.poll)
                if tokens is not None:
                    await asyncio.to_thread(tokens.poll)
            except Exception as exc:  # a poll logs its own refusals; this is a net
                logger.opt(exception=exc).error("checking the certificate or tokens files failed")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.health.enter_graceful_shutdown()
        self.runtime.releases.close()
        await self.runtime.watches.close()  # watch streams end now, UNAVAILABLE: clients resume
        self.runtime.sessions.close()  # sessions answer what they run, then end UNAVAILABLE
        current = self.runtime.current
        await self._server.stop(current.settings.server.shutdownGrace)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        await current.store.close()
        await asyncio.to_thread(current.telemetry.shutdown)
        self.repeats.flush(everything=True)
        logger.info("stopped")

    def _refused(self, method: str, reason: str, peer: str) -> None:
        """A request that could not be decoded was answered INVALID_ARGUMENT."""
        self.repeats.log(
            "WARNING", "undecodable", "bad request refused: {} from {}: {}", method, peer, reason
        )

    async def _summarise_repeats(self) -> None:
        """Write the counts of repeated log lines as they fall due."""
        while True:
            await asyncio.sleep(self.repeats.interval / 5)
            self.repeats.flush()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _probe_store(self) -> None:
        """Keep health SERVING exactly while the store in force answers its ping.

        Each probe also asks the store to look for a loss of its state, so a grace
        period starts (and shows in GetStatus and metrics) without waiting for a call.
        """
        runtime = self.runtime
        while True:
            interval = runtime.current.settings.server.healthInterval
            await asyncio.sleep(interval)
            # A grace period tied to an old, larger maxTtl ends with its last lease.
            runtime.current.store.grace_ms = runtime.state_loss_grace_ms()
            try:
                async with asyncio.timeout(interval):
                    await runtime.current.store.ping()
                    runtime.note_grace(await runtime.current.store.check_state())
                ok = True
            except (StoreUnavailable, TimeoutError) as exc:
                ok = False
                if runtime.store_reachable:
                    why = str(exc) or f"no answer within server.healthInterval ({interval:g} s)"
                    logger.error("store stopped answering, health is NOT_SERVING: {}", why)
            if ok and not runtime.store_reachable:
                logger.info("store answers again, health is SERVING")
            if ok != runtime.store_reachable:
                runtime.store_reachable = ok
                await self._set_health(SERVING if ok else NOT_SERVING)

    # -- hot reload ---------------------------------------------------------------------

    async def _watch_config(self, file: Path) -> None:
        """Apply each valid save of `file` and report every other one, until the server
        stops. No content and no failure ends the watch: a reload that fails is rejected,
        and a watch that fails is logged and started again (after 1 s, doubling to 30 s
        while it keeps failing)."""
        retry_s = 1.0
        while True:
            logger.info("watching {} for changes", file)
            try:
                async for update in watch_settings(file):
                    retry_s = 1.0
                    if isinstance(update, ConfigError):
                        message = str(update)
                        self._reload_rejected(
                            message if str(file) in message else f"{file}: {message}"
                        )
                        continue
                    try:
                        await self.apply(update)
                    except Exception as exc:
                        if self.runtime.current.settings is update:
                            logger.opt(exception=exc).error("config reload applied, then failed")
                        else:
                            logger.opt(exception=exc).debug("config reload failed")
                            self._reload_rejected(
                                f"{file}: cannot be applied: {type(exc).__name__}: {exc}"
                            )
            except Exception as exc:
                logger.opt(exception=exc).error(
                    "watching {} failed; watching again in {:g} s", file, retry_s
                )
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, 30.0)

    def _reload_rejected(self, reason: str) -> None:
        reason = "; ".join(line.strip() for line in reason.splitlines() if line.strip())
        self.runtime.reloads["rejected"] += 1
        self.runtime.last_reload = f"rejected: {reason}"
        logger.error("config reload rejected, the running config stays: {}", reason)

    async def apply(self, new: Settings) -> bool:
        """Put `new` in force whole, or leave everything as it is and say why.

        A change of only the store's policy keys (`store.ttl`, ...) applies to the store
        in place, so no lease is lost. Any other change of the store builds and connects
        a new one first; if it cannot connect, the reload is rejected. Calls already
        running finish on the old snapshot, but a swapped-out store grants nothing more
        (see `Runtime.swap` for the handover); it is closed once those calls finish.
        """
        runtime = self.runtime
        old = runtime.current
        try:
            access = self._access(new, self._tokens_for(new))
        except ConfigError as exc:
            self._reload_rejected(str(exc))
            return False
        store = old.store
        if new.backend.type != old.settings.backend.type or not store.reconfigure(
            new.store_settings()
        ):
            store = create_store(new)
            store.notify_releases(runtime.releases.released)
            try:
                await store.start()
            except StoreUnavailable as exc:
                await store.close()
                self._reload_rejected(f"the new store cannot be used: {exc}")
                return False
        telemetry = old.telemetry
        if new.observability.otelEndpoint and not old.settings.observability.otelEndpoint:
            logger.warning(
                "observability.otelEndpoint set: metrics are exported now, traces of calls"
                " after a restart (the tracing interceptor is installed at start)"
            )
        if new.observability != old.settings.observability:
            telemetry = self._telemetry(new)
            telemetry.carry_counts_from(old.telemetry)
        if new.logger != old.settings.logger:
            configure_logging(new.logger)
        if new.serverAddress != old.settings.serverAddress:
            logger.warning(
                "serverAddress changed to {}: this needs a restart, still serving on {}",
                new.serverAddress,
                old.settings.serverAddress,
            )
        for key, before, after in (
            (
                "observability.prometheusPort",
                old.settings.observability.prometheusPort,
                new.observability.prometheusPort,
            ),
            (
                "observability.prometheusAddress",
                old.settings.observability.prometheusAddress,
                new.observability.prometheusAddress,
            ),
            ("server.workers", old.settings.server.workers, new.server.workers),
            ("server.uvloop", old.settings.server.uvloop, new.server.uvloop),
            ("server.reflection", old.settings.server.reflection, new.server.reflection),
            ("server.tls", old.settings.server.tls, new.server.tls),
        ):
            if before != after:
                logger.warning("{} changed to {}: this needs a restart", key, after)
        if new.auth != old.settings.auth and access is not None:
            _warn_about_auth(new, tls=self.certificates is not None)
        if old.access is not None and access is None:
            logger.warning("auth is off now: every caller may do everything to every lock")
        runtime.swap(Snapshot(new, store, telemetry, access))
        store.grace_ms = runtime.state_loss_grace_ms()
        runtime.reloads["applied"] += 1
        runtime.last_reload = "applied"
        logger.info("config reloaded and applied: {}", _changed_sections(old.settings, new))
        if store is not old.store:
            handover = runtime.handover_left_ms()
            logger.warning(
                "store replaced by a new {} store; leases of the old store are not carried over{}",
                store.backend,
                f"; no lock is granted for {handover / 1000:g} s, the longest lease the old"
                " store may have granted"
                if handover
                else " (the state-loss grace period is off: no handover)",
            )
            await self._retire(old, old.store)
        if telemetry is not old.telemetry:
            await asyncio.to_thread(old.telemetry.shutdown)
        return True

    async def _retire(self, old: Snapshot, store: LockStore) -> None:
        """Close `store` once the calls still running on `old` have finished."""
        try:
            async with asyncio.timeout(old.settings.server.shutdownGrace):
                await old.drained()
        except TimeoutError:
            logger.warning("closing the old store with {} calls still running", old.in_flight)
        await store.close()


def _warn_about_auth(settings: Settings, *, tls: bool) -> None:
    if settings.auth.tokensFile and not tls:
        logger.warning(
            "auth.tokensFile is set but server.tls is not: bearer tokens cross the network"
            " in plain text, where anyone on the path can read and reuse them"
        )
    if not settings.auth.rules:
        logger.warning(
            "auth is on and auth.rules is empty: every call of the lock service is refused"
        )


def _changed_sections(old: Settings, new: Settings) -> str:
    changed = [name for name in Settings.model_fields if getattr(old, name) != getattr(new, name)]
    return ", ".join(changed) or "nothing changed"


@asynccontextmanager
async def running_server(
    settings: Settings, config_file: Path | None = None, *, reuse_port: bool = False
) -> AsyncIterator[LockServer]:
    """A started `LockServer`, stopped gracefully when the block exits."""
    server = LockServer(settings, config_file, reuse_port=reuse_port)
    await server.start()
    try:
        yield server
    finally:
        await asyncio.shield(server.stop())


async def serve(
    settings: Settings, config_file: Path | None = None, *, reuse_port: bool = False
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; reload `config_file` on change."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_server(settings, config_file, reuse_port=reuse_port):
        await stop.wait()
        logger.info("shutting down: refusing new calls, letting in-flight calls finish")
