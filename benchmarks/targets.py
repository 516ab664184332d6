"""The systems under test, each behind the same small `Session` interface.

- `echo`: the ceiling reference, a do-nothing grpc.aio server (`benchmarks.echo_server`)
  in its own process, answering the service's method paths with precomputed responses
  of the service's sizes.
- `memory`: the service with its memory store, called over gRPC.
- `redis`: the service with its Redis store, called over gRPC.
- `redis-direct`: the Redis store class called in-process, no gRPC and no service:
  the same Lua scripts on the same Redis, i.e. the floor the `redis` target sits on.
- `redis-sdk`: the `redis` service driven through the SDK: each benchmark client is a
  `QuorumQuestClient` (try_acquire_lock -> one renewal -> release_lock).
- `redis-cluster`: the service with its Redis store in cluster mode (`cluster: true`)
  on a throw-away Redis Cluster of 3 primaries + 3 replicas on 127.0.0.1, the tests'
  own (`tests.backends.redis_cluster`), started for the target and stopped after it.
- `memory+obs`, `redis+obs`: `memory` and `redis` with observability fully on: OTLP
  traces and metrics to a sink the harness runs as its own process
  (`benchmarks.otlp_sink`), metrics pushed every second, Prometheus on a free port.
- `memory+tls`, `redis+tls`: `memory` and `redis` secured: TLS on the port (a CA and
  server certificate made for the run, `tests.pki`), auth on with a tokens file holding
  one SHA-256 digest and one rule, and every call carrying `authorization: Bearer`.
- `scylladb`, `dynamodb`, `dynamodb-moto`: the service on those stores against stand-ins
  on this machine, started as the tests start them (`tests/backends`): one Apache
  Cassandra node (or `QQ_TEST_CQL_HOSTS`, loopback only), dynalite, moto in server mode.
  Not production: emulators and a single node, sharing the machine's cores.

The service runs as its own process, as a user runs it: `quorum-quest-service
-config=<file>` with a YAML file written to a temp dir, on 127.0.0.1 with a free port,
one process per target. Each benchmark client gets its own grpc.aio channel (its own
TCP connection) and calls the raw `LeaderElectionStub`, so no SDK sleeps or retries
are measured (except for `redis-sdk`). `redis-direct` stays in the benchmark process.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import (
    AbstractAsyncContextManager,
    ExitStack,
    asynccontextmanager,
    redirect_stdout,
)
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import grpc
import redis.asyncio as aioredis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.echo_server import RESPONSES
from benchmarks.otlp_sink import COUNTS_PREFIX
from benchmarks.proc import CpuProbe, cpu_probe, process_tree, socket_inodes, tcp_sockets
from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.client import QuorumQuestClient
from quorum_quest.stores import LockKey, LockStore, store_class
from quorum_quest.stores.redis import RedisSettings
from tests.backends import free_port
from tests.backends.cassandra import TEST_KEYSPACE, cql_server
from tests.backends.dynamodb import dynalite_process, moto_process
from tests.backends.redis_cluster import RedisCluster
from tests.pki import Authority

DEFAULT_TARGETS = ("echo", "memory", "redis", "redis-direct")
# The `redis` service driven through the SDK's client objects, run only when asked.
SDK = ("redis-sdk",)
# The `redis` store in cluster mode on a Redis Cluster started for it, run only when asked.
CLUSTERED = ("redis-cluster",)
# The `+obs` targets and the plain target each one adds observability to.
OBSERVED = {"memory+obs": "memory", "redis+obs": "redis"}
# The `+tls` targets (TLS and a bearer token per call) and the plain target of each.
SECURED = {"memory+tls": "memory", "redis+tls": "redis"}
# Targets on a store server started for them (see `store_server`), run only when asked.
EMULATED = ("scylladb", "dynamodb", "dynamodb-moto")
TARGETS = (*DEFAULT_TARGETS, *SDK, *CLUSTERED, *OBSERVED, *SECURED, *EMULATED)
# Where each target's code runs, for the printed header and the JSON file.
_SERVICE = "service in its own process (quorum-quest-service -config=<file>)"
_OBSERVED = f"{_SERVICE}, exporting OTLP to a sink process (python -m benchmarks.otlp_sink)"
_SECURED = (
    f"{_SERVICE}, TLS on the port, auth on (tokens file of SHA-256 digests, one rule), "
    "a bearer token on every call"
)
_SIZES = ", ".join(f"{name} {len(body)} B" for name, body in RESPONSES.items())
WHERE = {
    "echo": "do-nothing grpc.aio server in its own process (python -m benchmarks.echo_server), "
    f"on uvloop, answering precomputed responses of the service's sizes ({_SIZES})",
    "memory": _SERVICE,
    "redis": _SERVICE,
    "redis-direct": "store called in the benchmark process, no gRPC",
    "redis-sdk": f"{_SERVICE}, called through one QuorumQuestClient per benchmark client "
    "(try_acquire_lock -> one renewal -> release_lock)",
    "redis-cluster": f"{_SERVICE}, redis store with cluster: true on a Redis Cluster of 3 "
    "primaries + 3 replicas (6 redis-server processes) on this machine",
    "memory+obs": _OBSERVED,
    "redis+obs": _OBSERVED,
    "memory+tls": _SECURED,
    "redis+tls": _SECURED,
    "scylladb": f"{_SERVICE}, scylladb store against a single Cassandra node on this machine, "
    "not production",
    "dynamodb": f"{_SERVICE}, dynamodb store against an emulator (dynalite) on this machine, "
    "not production",
    "dynamodb-moto": f"{_SERVICE}, dynamodb store against an emulator (moto server, one "
    "request at a time) on this machine, not production",
}
SERVICE_START_TIMEOUT_S = 30.0  # until the health check answers SERVING
STORE_SERVICE_START_TIMEOUT_S = 120.0  # the same, when the store first creates its schema
SERVICE_STOP_TIMEOUT_S = 15.0  # after SIGTERM, before SIGKILL
REPO_ROOT = Path(__file__).resolve().parent.parent
TTL_MS = 10_000  # far longer than a cycle: a lease never expires under the benchmark

# A local subchannel pool gives every channel its own connection instead of
# sharing one connection among channels with the same target and options.
CLIENT_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


class Session(Protocol):
    """One benchmark client's handle on a target. Each call raises on failure."""

    async def acquire(self, key: LockKey, client_id: str) -> bool:
        """True when the lock was granted to `client_id`."""

    async def keep_alive(self, key: LockKey, client_id: str) -> bool:
        """True when the lease was renewed."""

    async def release(self, key: LockKey, client_id: str) -> bool:
        """True when this call released the lock."""

    async def close(self) -> None: ...


class Target(Protocol):
    name: str
    exported: dict[str, Any]  # what an observed target's telemetry delivered; else empty
    pid: int | None  # the server process (with its descendants); None: calls run in-process

    async def open_session(self) -> Session: ...


# -- the service over gRPC ------------------------------------------------------------


@dataclass(frozen=True)
class Secure:
    """How a client reaches a secured service: TLS credentials, and metadata on each call."""

    credentials: grpc.ChannelCredentials
    metadata: tuple[tuple[str, str], ...]


def open_channel(
    address: str, secure: Secure | None, options: tuple[tuple[str, Any], ...] = ()
) -> grpc.aio.Channel:
    if secure is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, secure.credentials, options=options)


class ServiceSession:
    """One grpc.aio channel and stub; every call has a deadline of `timeout` seconds."""

    def __init__(self, address: str, timeout: float, secure: Secure | None = None) -> None:
        self._timeout = timeout
        self._channel = open_channel(address, secure, CLIENT_CHANNEL_OPTIONS)
        self._stub = LeaderElectionStub(self._channel)
        self._metadata = secure.metadata if secure is not None else None

    async def connect(self) -> None:
        async with asyncio.timeout(self._timeout):
            await self._channel.channel_ready()

    async def acquire(self, key: LockKey, client_id: str) -> bool:
        request = pb.TryAcquireLockRequest(
            service=key.service, domain=key.domain, client_id=client_id, ttl_ms=TTL_MS
        )
        reply = await self._stub.try_acquire_lock(
            request, timeout=self._timeout, metadata=self._metadata
        )
        return reply.is_leader

    async def keep_alive(self, key: LockKey, client_id: str) -> bool:
        request = pb.KeepAliveRequest(
            service=key.service, domain=key.domain, client_id=client_id, ttl_ms=TTL_MS
        )
        reply = await self._stub.keep_alive(request, timeout=self._timeout, metadata=self._metadata)
        return reply.lease_length is not None and reply.lease_length > timedelta(0)

    async def release(self, key: LockKey, client_id: str) -> bool:
        request = pb.ReleaseLockRequest(service=key.service, domain=key.domain, client_id=client_id)
        reply = await self._stub.release_lock(
            request, timeout=self._timeout, metadata=self._metadata
        )
        return reply.released

    async def close(self) -> None:
        await self._channel.close()


class ServiceTarget:
    def __init__(
        self,
        name: str,
        address: str,
        timeout: float,
        pid: int | None = None,
        secure: Secure | None = None,
    ) -> None:
        self.name = name
        self.exported: dict[str, Any] = {}
        self.address = address
        self.pid = pid  # the process started (with workers, their supervisor)
        self._timeout = timeout
        self._secure = secure

    async def open_session(self) -> ServiceSession:
        session = ServiceSession(self.address, self._timeout, self._secure)
        await session.connect()
        return session


def service_command(config: Path) -> list[str]:
    """The console script next to this interpreter, or `python -m quorum_quest.cli`."""
    script = Path(sys.executable).with_name("quorum-quest-service")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "quorum_quest.cli"]
    return [*launcher, f"-config={config}"]


async def wait_serving(
    process: asyncio.subprocess.Process,
    address: str,
    start_timeout: float,
    secure: Secure | None = None,
) -> None:
    """Poll the gRPC health check (service "") until it answers SERVING."""
    deadline = time.monotonic() + start_timeout
    async with open_channel(address, secure) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"the service exited with code {process.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the service on {address} was not SERVING in {start_timeout:g} s")


async def wait_listening(pid: int, port: int, workers: int, start_timeout: float) -> None:
    """Until `workers` processes under `pid` listen on `port`.

    The health check answers from whichever worker took its connection; connections made
    before every worker listens would all go to the ones that do.
    """
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        listening = tcp_sockets(port, "0A")
        if sum(bool(socket_inodes(p) & listening) for p in process_tree(pid)) >= workers:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(
        f"{workers} workers did not all listen on port {port} in {start_timeout:g} s"
    )


async def stop_service(process: asyncio.subprocess.Process) -> None:
    """SIGTERM and wait for the exit; SIGKILL after `SERVICE_STOP_TIMEOUT_S`."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), SERVICE_STOP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()


@asynccontextmanager
async def service_target(
    name: str,
    backend: str,
    store: dict[str, Any],
    timeout: float,
    observability: dict[str, Any] | None = None,
    start_timeout: float = SERVICE_START_TIMEOUT_S,
    workers: int = 1,
    security: dict[str, Any] | None = None,
    secure: Secure | None = None,
) -> AsyncIterator[ServiceTarget]:
    """The service with `backend` in its own process on 127.0.0.1 until the block exits.

    With `workers` > 1 (`server.workers`) that process is the supervisor of the worker
    processes, and the block starts once every worker listens. `security` holds the
    `server.tls` and `auth` sections of a secured target, and `secure` how to reach it.
    """
    port = free_port()
    address = f"127.0.0.1:{port}"
    config = {
        "serverAddress": address,
        "backend": {"type": backend},
        "store": store,
        "logger": {"level": "WARNING"},
        # Each run starts on a fresh store with no earlier holder to protect, so the
        # state-loss grace period (which would refuse the first grants) is off.
        "server": {"stateLossGrace": 0, "workers": workers},
    }
    if observability:
        config["observability"] = observability
    if security:
        config["server"]["tls"] = security["tls"]
        config["auth"] = security["auth"]
    # The file is the whole config: no QUORUMQUEST_* (or OTEL_*, read by the OTLP
    # exporters) variable from this shell changes it.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("QUORUMQUEST_", "OTEL_"))
    }
    with tempfile.TemporaryDirectory(prefix="qq-bench-service-") as workdir:
        config_file = Path(workdir) / "config.yaml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        # stdout is dropped to keep the table clean; the service logs to stderr.
        process = await asyncio.create_subprocess_exec(
            *service_command(config_file), stdout=asyncio.subprocess.DEVNULL, env=env
        )
        try:
            await wait_serving(process, address, start_timeout, secure)
            await wait_listening(process.pid, port, workers, start_timeout)
            yield ServiceTarget(name, address, timeout, process.pid, secure)
        finally:
            await stop_service(process)


# -- the service through the SDK --------------------------------------------------------


class SdkSession:
    """One `QuorumQuestClient`, made for the lock of the first call.

    Each client has its own channel, but gRPC lets channels with the same address and
    options in one process share a connection: the SDK clients of a cell share one TCP
    connection, as an application's clients would. The SDK connects on its first
    call, so connecting happens in the warm-up. The
    renewal is `QuorumQuestClient._renew`: the one call the SDK's keep-alive loop
    makes per interval (the loop's sleep is what a throughput benchmark leaves out).
    The SDK's channel has its OpenTelemetry client interceptor, as for any user.
    """

    def __init__(self, address: str, timeout: float) -> None:
        self._address = address
        self._timeout = timeout
        self._client: QuorumQuestClient | None = None

    def _client_for(self, key: LockKey, client_id: str) -> QuorumQuestClient:
        if self._client is None:
            self._client = QuorumQuestClient(
                key.service,
                key.domain,
                ttl=TTL_MS / 1000,
                address=self._address,
                client_id=client_id,
                rpc_timeout=self._timeout,
            )
        return self._client

    async def acquire(self, key: LockKey, client_id: str) -> bool:
        return await self._client_for(key, client_id).try_acquire_lock()

    async def keep_alive(self, key: LockKey, client_id: str) -> bool:
        return await self._client_for(key, client_id)._renew(self._timeout) is not None

    async def release(self, key: LockKey, client_id: str) -> bool:
        return await self._client_for(key, client_id).release_lock()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class SdkTarget:
    def __init__(self, name: str, address: str, timeout: float, pid: int | None) -> None:
        self.name = name
        self.exported: dict[str, Any] = {}
        self.pid = pid
        self._address = address
        self._timeout = timeout

    async def open_session(self) -> SdkSession:
        return SdkSession(self._address, self._timeout)


# -- the ceiling reference ----------------------------------------------------------------


@asynccontextmanager
async def echo_target(timeout: float) -> AsyncIterator[ServiceTarget]:
    """`benchmarks.echo_server` in its own process on 127.0.0.1 until the block exits."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "benchmarks.echo_server", "--port", "0"),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), SERVICE_START_TIMEOUT_S)
        if not line.startswith(b"ready "):
            raise RuntimeError(f"the echo server did not start (exit code {process.returncode})")
        address = f"127.0.0.1:{int(line.split()[1])}"
        yield ServiceTarget("echo", address, timeout, process.pid)
    finally:
        await stop_service(process)


# -- the service with observability on ------------------------------------------------


class OtlpSink:
    """The `benchmarks.otlp_sink` process: its port, and its counts once it has stopped."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.port = 0
        self.counts: dict[str, int] = {}

    async def stop(self) -> None:
        """SIGTERM, then read the counts line; any other output goes to our stderr."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.wait_for(self.process.communicate(), SERVICE_STOP_TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            return
        for line in err.decode(errors="replace").splitlines():
            if line.startswith(COUNTS_PREFIX):
                self.counts = json.loads(line.removeprefix(COUNTS_PREFIX))
            else:
                print(f"otlp-sink: {line}", file=sys.stderr)


@asynccontextmanager
async def otlp_sink() -> AsyncIterator[OtlpSink]:
    """An OTLP/gRPC receiver in its own process, so receiving costs the load generator nothing."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "benchmarks.otlp_sink", "--port", "0"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    sink = OtlpSink(process)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), SERVICE_START_TIMEOUT_S)
        if not line.startswith(b"ready "):
            raise RuntimeError(f"the OTLP sink did not start (exit code {process.returncode})")
        sink.port = int(line.split()[1])
        yield sink
    finally:
        await sink.stop()


async def prometheus_samples(port: int) -> int | None:
    """Scrape the service's Prometheus endpoint once: its number of quorum_quest samples."""

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    try:
        text = await asyncio.to_thread(scrape)
    except OSError as exc:
        print(f"Prometheus scrape on port {port} failed: {exc}", file=sys.stderr)
        return None
    return sum(1 for line in text.splitlines() if line.startswith("quorum_quest"))


@asynccontextmanager
async def observed_service_target(
    name: str, backend: str, store: dict[str, Any], timeout: float, trace_sample_ratio: float
) -> AsyncIterator[ServiceTarget]:
    """`service_target` with observability fully on: OTLP to a sink, 1 s metrics, Prometheus.

    When the block exits, `target.exported` has the sink's counts (taken after the
    service has stopped, so its final flush is in them) and one Prometheus scrape.
    """
    async with otlp_sink() as sink:
        prometheus_port = free_port()
        observability = {
            "otelEndpoint": f"127.0.0.1:{sink.port}",
            "otelInsecure": True,
            "traceSampleRatio": trace_sample_ratio,
            "metricsInterval": 1,
            "prometheusPort": prometheus_port,
        }
        async with service_target(name, backend, store, timeout, observability) as target:
            yield target
            target.exported["prometheus_samples"] = await prometheus_samples(prometheus_port)
    target.exported.update(sink.counts)


# -- the service with TLS and tokens ------------------------------------------------------


@asynccontextmanager
async def secured_service_target(
    name: str, backend: str, store: dict[str, Any], timeout: float
) -> AsyncIterator[ServiceTarget]:
    """`service_target` with TLS on the port and a bearer token on every call.

    A CA and a server certificate (EC P-256) are made for the run; the tokens file holds
    the SHA-256 digest of one random token, and one rule lets its identity lock the
    harness's locks, so every call is identified, authorized and checked for ownership.
    """
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="qq-bench-tls-") as workdir:
        authority = Authority(Path(workdir))
        server = authority.issue("server", server=True)
        tokens = Path(workdir) / "tokens.yaml"
        digest = hashlib.sha256(token.encode()).hexdigest()
        tokens.write_text(yaml.safe_dump({"bench": f"sha256:{digest}"}), encoding="utf-8")
        security = {
            "tls": {"certFile": str(server.cert_file), "keyFile": str(server.key_file)},
            "auth": {
                "tokensFile": str(tokens),
                "rules": [{"identity": "bench", "locks": "qq-bench/*", "allow": ["lock"]}],
            },
        }
        secure = Secure(
            grpc.ssl_channel_credentials(root_certificates=authority.cert_pem),
            (("authorization", f"Bearer {token}"),),
        )
        async with service_target(
            name, backend, store, timeout, security=security, secure=secure
        ) as target:
            yield target


# -- the Redis store, called directly --------------------------------------------------


class DirectSession:
    """Calls the shared store object, each call bounded by `timeout` seconds."""

    def __init__(self, store: LockStore, timeout: float) -> None:
        self._store = store
        self._timeout = timeout

    async def acquire(self, key: LockKey, client_id: str) -> bool:
        async with asyncio.timeout(self._timeout):
            return (await self._store.acquire(key, client_id, TTL_MS)).acquired

    async def keep_alive(self, key: LockKey, client_id: str) -> bool:
        async with asyncio.timeout(self._timeout):
            return (await self._store.keep_alive(key, client_id, TTL_MS)).renewed

    async def release(self, key: LockKey, client_id: str) -> bool:
        async with asyncio.timeout(self._timeout):
            return await self._store.release(key, client_id)

    async def close(self) -> None:
        return None


class DirectTarget:
    def __init__(self, name: str, store: LockStore, timeout: float) -> None:
        self.name = name
        self.exported: dict[str, Any] = {}
        self.pid: int | None = None  # the store runs in the benchmark process
        self._store = store
        self._timeout = timeout

    async def open_session(self) -> DirectSession:
        return DirectSession(self._store, self._timeout)


@asynccontextmanager
async def redis_direct_target(
    url: str, key_prefix: str, timeout: float
) -> AsyncIterator[DirectTarget]:
    """One started Redis store shared by all clients, as the service shares its one store."""
    store = store_class("redis")(RedisSettings(url=url, key_prefix=key_prefix))
    await store.start()
    try:
        yield DirectTarget("redis-direct", store, timeout)
    finally:
        await store.close()


# -- the service on a store server started for it ---------------------------------------


def loopback_cql_hosts() -> None:
    """`QQ_TEST_CQL_HOSTS` is honoured as the tests honour it, but only on this machine."""
    if hosts := os.environ.get("QQ_TEST_CQL_HOSTS"):
        host = hosts.split(",")[0].strip().rpartition(":")[0].strip("[]")
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ValueError(
                f"QQ_TEST_CQL_HOSTS={hosts}: only a CQL server on 127.0.0.1 is allowed"
            )


@asynccontextmanager
async def store_server(name: str, run_id: str) -> AsyncIterator[dict[str, Any]]:
    """The `store:` section for target `name`, on a server started for it and stopped after.

    The servers are the tests' own (`tests/backends`), started in the event loop's
    thread: between targets nothing else runs. The store sections are the tests'
    (`scylladb_store_config`, `dynamodb_*_store_config`), each with a table of its own.
    """
    if name == "scylladb":
        loopback_cql_hosts()
        with ExitStack() as stack:
            with redirect_stdout(sys.stderr):  # its "accepted CQL after" line is progress
                endpoint = stack.enter_context(cql_server())
            yield {
                "endpoints": [endpoint],
                "keyspace": TEST_KEYSPACE,
                "table": f"locks_bench_{run_id}",
                "consistency": "CONSISTENCY_QUORUM",
                "clock_skew_margin": 0.05,
                "request_timeout": 10.0,
            }
        return
    # A throw-away emulator: its tables go with it.
    with moto_process() if name == "dynamodb-moto" else dynalite_process() as emulator:
        yield emulator.endpoint.store_config(table=f"qq-bench-{run_id}")


# -- the service on a Redis Cluster ----------------------------------------------------


class ClusterTarget(ServiceTarget):
    """The service on a Redis Cluster, and the pids of the cluster's redis-servers by role
    (as they were when the target started: the harness makes no failover)."""

    def __init__(
        self,
        target: ServiceTarget,
        timeout: float,
        primary_pids: list[int],
        replica_pids: list[int],
    ) -> None:
        super().__init__(target.name, target.address, timeout, target.pid)
        self.primary_pids = primary_pids
        self.replica_pids = replica_pids


def cluster_pids(cluster: RedisCluster) -> tuple[list[int], list[int]]:
    """The pids of the cluster's primaries and of its replicas.

    Each node runs as `_die_with_parent.py redis-server ...`, which execs redis-server
    in the same process, so the node's pid is redis-server's.
    """
    primaries = cluster.primaries()
    pids = {node.address: node.process.pid for node in cluster.nodes if node.process}
    primary_pids = [pids[node.address] for node in primaries]
    return primary_pids, [pid for pid in pids.values() if pid not in primary_pids]


def cluster_store(cluster: RedisCluster, key_prefix: str) -> dict[str, Any]:
    """The `store:` section of the `redis` store on `cluster`, seeded with two nodes."""
    return {"cluster": True, "nodes": cluster.seeds[:2], "key_prefix": key_prefix}


@asynccontextmanager
async def redis_cluster_target(name: str, timeout: float) -> AsyncIterator[ClusterTarget]:
    """The service on a Redis Cluster started for it; both stop when the block exits."""
    # Started in the event loop's thread: each node dies with the thread that started it
    # (PR_SET_PDEATHSIG, tests/backends/_die_with_parent.py), so it never outlives the
    # harness, and must not be started from a worker thread that ends before it.
    with RedisCluster() as cluster:
        primary_pids, replica_pids = cluster_pids(cluster)
        store = cluster_store(cluster, f"qq-bench-{name}")
        async with service_target(name, "redis", store, timeout) as target:
            yield ClusterTarget(target, timeout, primary_pids, replica_pids)


# -- choosing a target ------------------------------------------------------------------


def on_redis(name: str) -> bool:
    """Whether target `name` runs on Redis (and so needs a Redis URL)."""
    return name.startswith("redis")


def target_cpu_probe(target: Target, redis: int | None) -> CpuProbe:
    """Reads the CPU seconds of this process, of `target`'s server and, for a target on
    Redis, of the redis-server with pid `redis` (a cluster's own: its primaries, and its
    replicas apart)."""
    if isinstance(target, ClusterTarget):
        return cpu_probe(target.pid, target.primary_pids, True, target.replica_pids)
    return cpu_probe(target.pid, redis, on_redis(target.name))


async def delete_keys(url: str, key_prefix: str) -> int:
    """Delete what a run left in Redis (its state marker, and any lease left)."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}:*", count=1000)]
        return await client.delete(*keys) if keys else 0
    finally:
        await client.aclose()


@asynccontextmanager
async def open_target(
    name: str, *, redis_url: str | None, run_id: str, timeout: float, trace_sample_ratio: float
) -> AsyncIterator[Target]:
    """The target called `name`, ready for sessions until the block exits.

    `trace_sample_ratio` is used by the `+obs` targets only.
    """
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    if name == "echo":
        async with echo_target(timeout) as target:
            yield target
        return
    if name in CLUSTERED:  # a cluster of its own, thrown away with its keys
        async with redis_cluster_target(name, timeout) as target:
            yield target
        return
    backend = OBSERVED.get(name) or SECURED.get(name) or ("redis" if name in SDK else name)

    def service(store: dict[str, Any]) -> AbstractAsyncContextManager[ServiceTarget]:
        if name in OBSERVED:
            return observed_service_target(name, backend, store, timeout, trace_sample_ratio)
        if name in SECURED:
            return secured_service_target(name, backend, store, timeout)
        return service_target(name, backend, store, timeout)

    if backend == "memory":
        async with service({}) as target:
            yield target
        return
    if name in EMULATED:
        store_type = name.split("-")[0]  # dynamodb-moto runs the dynamodb store
        async with (
            store_server(name, run_id) as store,
            service_target(
                name, store_type, store, timeout, start_timeout=STORE_SERVICE_START_TIMEOUT_S
            ) as target,
        ):
            yield target
        return
    if redis_url is None:
        raise ValueError(f"target {name!r} needs a Redis URL")
    key_prefix = f"qq-bench-{run_id}-{name}"
    try:
        if name in SDK:
            async with service({"url": redis_url, "key_prefix": key_prefix}) as target:
                yield SdkTarget(name, target.address, timeout, target.pid)
        elif backend == "redis":
            async with service({"url": redis_url, "key_prefix": key_prefix}) as target:
                yield target
        else:
            async with redis_direct_target(redis_url, key_prefix, timeout) as target:
                yield target
    finally:
        await delete_keys(redis_url, key_prefix)
