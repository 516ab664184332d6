"""TLS, mTLS, identities, rules, lease ownership and quotas, over grpc's real TLS stack.

Every certificate is made at test time (`tests.pki`): a CA, server and client
certificates signed by it, an expired one and one from a foreign CA. Servers run
in-process (`running_server`) unless a test is about how the command starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from loguru import logger

from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.server import LockServer, running_server
from quorum_quest.server.access import HOLDER_SEPARATOR
from quorum_quest.stores import LockKey
from tests.backends import free_port
from tests.conftest import make_settings
from tests.pki import Authority, Issued, common_name

# Generous: the suite must pass on a loaded 2-core machine. Nothing is judged by speed.
BUDGET_S = 30.0
StatusCode = grpc.StatusCode


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    """Every record the service logs during the test, DEBUG and up."""
    seen: list[dict[str, Any]] = []
    sink = logger.add(lambda message: seen.append(message.record), level="DEBUG")
    yield seen
    logger.remove(sink)


def tls_config(server: Issued, client_ca: Authority | None = None) -> dict[str, str]:
    config = {"certFile": str(server.cert_file), "keyFile": str(server.key_file)}
    if client_ca is not None:
        config["clientCaFile"] = str(client_ca.cert_file)
    return config


def rule(identity: str, locks: str = "*", allow: tuple[str, ...] = ("lock", "read")) -> dict:
    return {"identity": identity, "locks": locks, "allow": list(allow)}


def write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    path.write_text(yaml.safe_dump(tokens))
    return path


@asynccontextmanager
async def serving(
    backend: str = "memory", store: dict[str, Any] | None = None, **overrides: Any
) -> AsyncIterator[LockServer]:
    async with running_server(make_settings(backend, store or {}, **overrides)) as server:
        yield server


def secure_channel(
    server: LockServer, ca: Authority, client: Issued | None = None
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials)


def plain_channel(server: LockServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def acquire(domain: str, client_id: str, service: str = "shared", **fields: Any) -> Any:
    return pb.TryAcquireLockRequest(service=service, domain=domain, client_id=client_id, **fields)


def lock(domain: str, client_id: str, service: str = "shared") -> dict[str, str]:
    return {"service": service, "domain": domain, "client_id": client_id}


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


def presented_certificate(port: int, ca: Authority, client: Issued | None = None) -> str:
    """The CN of the certificate the port presents to a new connection (blocking)."""
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(str(client.cert_file), str(client.key_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as connection:
            der = connection.getpeercert(binary_form=True)
    assert der is not None
    return common_name(der)


async def eventually(check: Any, what: str) -> Any:
    """Poll `check()` (sync or async) until truthy, within `BUDGET_S`."""
    async with asyncio.timeout(BUDGET_S):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.1)
    raise AssertionError(what)


# -- TLS and mTLS -----------------------------------------------------------------------


async def test_a_tls_port_serves_tls_clients_and_refuses_plaintext(
    ca: Authority, server_cert: Issued
) -> None:
    async with serving(server={"tls": tls_config(server_cert)}) as server:
        async with secure_channel(server, ca) as channel:
            stub = LeaderElectionStub(channel)
            assert (await stub.try_acquire_lock(acquire("d", "c"))).is_leader
        async with plain_channel(server) as channel:
            error = await refused(
                LeaderElectionStub(channel).try_acquire_lock(acquire("d", "c"), timeout=5)
            )
        assert error.code() == StatusCode.UNAVAILABLE


async def test_mtls_takes_the_identity_from_the_client_certificate(
    ca: Authority, server_cert: Issued
) -> None:
    billing = ca.issue("billing-1")
    spiffe = ca.issue("spiffe", common_name="", uris=("spiffe://example.org/billing-2",))
    rules = [rule("billing-*", "billing/*"), rule("spiffe://example.org/billing-*", "billing/*")]
    tls = tls_config(server_cert, ca)
    async with serving(server={"tls": tls}, auth={"rules": rules}) as server:
        for client, client_id in ((billing, "worker"), (spiffe, "worker")):
            async with secure_channel(server, ca, client) as channel:
                stub = LeaderElectionStub(channel)
                domain = uuid.uuid4().hex
                answer = await stub.try_acquire_lock(acquire(domain, client_id, "billing"))
                assert answer.is_leader and answer.leader_id == client_id
                held = await server.runtime.current.store.get_leader(LockKey("billing", domain))
                identity = common_name(client.cert_pem) or "spiffe://example.org/billing-2"
                assert held is not None and held.client_id == f"{identity}\x1f{client_id}"


async def test_mtls_refuses_clients_without_a_certificate_expired_or_from_a_foreign_ca(
    ca: Authority, server_cert: Issued, tmp_path: Path
) -> None:
    foreign_dir = tmp_path / "foreign"
    foreign_dir.mkdir()
    foreign = Authority(foreign_dir, "foreign-ca").issue("billing-1")
    expired = ca.issue("billing-old", expired=True)
    tls = tls_config(server_cert, ca)
    async with serving(server={"tls": tls}, auth={"rules": [rule("*")]}) as server:
        for client in (None, foreign, expired):
            async with secure_channel(server, ca, client) as channel:
                error = await refused(
                    LeaderElectionStub(channel).try_acquire_lock(acquire("d", "c"), timeout=5)
                )
            assert error.code() == StatusCode.UNAVAILABLE, client
        async with secure_channel(server, ca, ca.issue("billing-1")) as channel:
            assert (await LeaderElectionStub(channel).try_acquire_lock(acquire("d", "c"))).is_leader


# -- tokens and rules -------------------------------------------------------------------


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    digest = hashlib.sha256(b"token-of-payroll").hexdigest()
    return write_tokens(
        tmp_path / "tokens.yaml",
        {"billing-app": "token-of-billing", "payroll-app": f"sha256:{digest}"},
    )


async def test_tokens_identify_callers_and_bad_or_missing_ones_are_unauthenticated(
    ca: Authority, server_cert: Issued, tokens: Path
) -> None:
    rules = [rule("billing-*", "billing/*"), rule("payroll-*", "payroll/*")]
    auth = {"tokensFile": str(tokens), "rules": rules}
    async with serving(server={"tls": tls_config(server_cert)}, auth=auth) as server:
        async with secure_channel(server, ca) as channel:
            stub = LeaderElectionStub(channel)
            granted = await stub.try_acquire_lock(
                acquire("eu", "w1", "billing"), metadata=bearer("token-of-billing")
            )
            assert granted.is_leader
            granted = await stub.try_acquire_lock(
                acquire("eu", "w1", "payroll"), metadata=bearer("token-of-payroll")
            )
            assert granted.is_leader
            unknown = await refused(
                stub.try_acquire_lock(acquire("eu", "w1", "billing"), metadata=bearer("guess"))
            )
            assert unknown.code() == StatusCode.UNAUTHENTICATED
            assert "guess" not in unknown.details()
            missing = await refused(stub.try_acquire_lock(acquire("eu", "w1", "billing")))
            assert missing.code() == StatusCode.UNAUTHENTICATED
            assert "no credentials" in missing.details()
            basic = await refused(
                stub.try_acquire_lock(
                    acquire("eu", "w1", "billing"), metadata=(("authorization", "Basic eDp5"),)
                )
            )
            assert basic.code() == StatusCode.UNAUTHENTICATED


async def test_rules_refuse_other_locks_with_permission_denied_naming_lock_and_operation(
    ca: Authority, server_cert: Issued, tokens: Path
) -> None:
    rules = [rule("billing-*", "billing/*"), rule("payroll-*", "payroll/*", ("read",))]
    auth = {"tokensFile": str(tokens), "rules": rules}
    async with serving(server={"tls": tls_config(server_cert)}, auth=auth) as server:
        async with secure_channel(server, ca) as channel:
            stub = LeaderElectionStub(channel)
            billing = bearer("token-of-billing")
            denied = await refused(
                stub.try_acquire_lock(acquire("eu", "w1", "payroll"), metadata=billing)
            )
            assert denied.code() == StatusCode.PERMISSION_DENIED
            assert "payroll/eu" in denied.details() and "acquire" in denied.details()
            payroll = bearer("token-of-payroll")
            for call in (
                stub.try_acquire_lock(acquire("eu", "w1", "payroll"), metadata=payroll),
                stub.keep_alive(
                    pb.KeepAliveRequest(**lock("eu", "w1", "payroll")), metadata=payroll
                ),
                stub.release_lock(
                    pb.ReleaseLockRequest(**lock("eu", "w1", "payroll")), metadata=payroll
                ),
                stub.keep_alive_many(
                    pb.KeepAliveManyRequest(
                        client_id="w1", locks=[pb.LockRef(service="payroll", domain="eu")]
                    ),
                    metadata=payroll,
                ),
            ):
                assert (await refused(call)).code() == StatusCode.PERMISSION_DENIED
            leader = await stub.get_leader(
                pb.GetLeaderRequest(service="payroll", domain="eu"), metadata=payroll
            )
            assert not leader.has_leader  # read is allowed
            status = await refused(stub.get_status(pb.GetStatusRequest(), metadata=billing))
            assert status.code() == StatusCode.PERMISSION_DENIED


# -- lease ownership --------------------------------------------------------------------


async def test_a_lease_belongs_to_the_identity_that_acquired_it(
    backend: str, store_config: dict[str, Any], tmp_path: Path
) -> None:
    """The stealing sequence: A acquires, B reads the holder and releases (and renews) as
    A's client_id, C acquires. B is refused, C is not granted, A still leads; and two
    identities with the same client_id never share the lease."""
    tokens = write_tokens(
        tmp_path / "tokens.yaml", {"a": "token-a", "b": "token-b", "c": "token-c"}
    )
    auth = {"tokensFile": str(tokens), "rules": [rule("*", "shared/*")]}
    domain = uuid.uuid4().hex
    async with serving(backend, store_config, auth=auth) as server:
        async with plain_channel(server) as channel:
            stub = LeaderElectionStub(channel)
            a, b, c = bearer("token-a"), bearer("token-b"), bearer("token-c")
            granted = await stub.try_acquire_lock(acquire(domain, "a-1", ttl=30), metadata=a)
            assert granted.is_leader
            leader = await stub.get_leader(
                pb.GetLeaderRequest(service="shared", domain=domain), metadata=b
            )
            assert leader.has_leader and leader.client_id == "a-1"  # readers see the client_id
            release = await refused(
                stub.release_lock(pb.ReleaseLockRequest(**lock(domain, "a-1")), metadata=b)
            )
            assert release.code() == StatusCode.PERMISSION_DENIED
            assert f"shared/{domain}" in release.details() and "release" in release.details()
            renewal = await stub.keep_alive(pb.KeepAliveRequest(**lock(domain, "a-1")), metadata=b)
            assert renewal.lease_length == timedelta(seconds=-1)  # not B's lease
            many = await stub.keep_alive_many(
                pb.KeepAliveManyRequest(
                    client_id="a-1", locks=[pb.LockRef(service="shared", domain=domain)]
                ),
                metadata=b,
            )
            assert many.fencing_tokens == [0]  # not renewed
            taken = await stub.try_acquire_lock(acquire(domain, "c-1"), metadata=c)
            assert not taken.is_leader and taken.leader_id == "a-1"
            # The same client_id under another identity is another holder.
            same_id = await stub.try_acquire_lock(acquire(domain, "a-1"), metadata=c)
            assert not same_id.is_leader
            renewed = await stub.keep_alive(pb.KeepAliveRequest(**lock(domain, "a-1")), metadata=a)
            assert renewed.fencing_token == granted.fencing_token
            released = await stub.release_lock(
                pb.ReleaseLockRequest(**lock(domain, "a-1")), metadata=a
            )
            assert released.released
            # Once free, B with the same client_id gets a lease of its own.
            own = await stub.try_acquire_lock(acquire(domain, "a-1"), metadata=b)
            assert own.is_leader and own.leader_id == "a-1"
            late = await stub.keep_alive(pb.KeepAliveRequest(**lock(domain, "a-1")), metadata=a)
            assert late.lease_length == timedelta(seconds=-1)  # B's lease, not A's
            steal = await refused(
                stub.release_lock(pb.ReleaseLockRequest(**lock(domain, "a-1")), metadata=a)
            )
            assert steal.code() == StatusCode.PERMISSION_DENIED


async def test_original_clients_work_as_anonymous_where_a_rule_allows(tmp_path: Path) -> None:
    """Unmodified clients (plaintext, no token) keep working on the locks a rule for
    `anonymous` names, with the bare client_id as holder, as before auth was on."""
    tokens = write_tokens(tmp_path / "tokens.yaml", {"new-app": "token-new"})
    rules = [rule("anonymous", "legacy/*"), rule("new-*", "*")]
    domain = uuid.uuid4().hex
    async with serving(auth={"tokensFile": str(tokens), "rules": rules}) as server:
        async with plain_channel(server) as channel:
            stub = LeaderElectionStub(channel)
            old = await stub.try_acquire_lock(acquire(domain, "uuid-1", "legacy", ttl=10))
            assert old.is_leader
            held = await server.runtime.current.store.get_leader(LockKey("legacy", domain))
            assert held is not None and held.client_id == "uuid-1"  # no identity: as before
            renewed = await stub.keep_alive(
                pb.KeepAliveRequest(**lock(domain, "uuid-1", "legacy"), ttl=10)
            )
            assert renewed.lease_length.total_seconds() == 10
            elsewhere = await refused(stub.try_acquire_lock(acquire(domain, "uuid-1", "billing")))
            assert elsewhere.code() == StatusCode.UNAUTHENTICATED
            # An identified client cannot free the anonymous lease by reusing its client_id.
            steal = await refused(
                stub.release_lock(
                    pb.ReleaseLockRequest(**lock(domain, "uuid-1", "legacy")),
                    metadata=bearer("token-new"),
                )
            )
            assert steal.code() == StatusCode.PERMISSION_DENIED
            released = await stub.release_lock(
                pb.ReleaseLockRequest(**lock(domain, "uuid-1", "legacy"))
            )
            assert released.released


# -- quotas -----------------------------------------------------------------------------


async def test_the_lease_quota_refuses_one_lease_too_many_with_resource_exhausted(
    tmp_path: Path,
) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"a": "token-a", "b": "token-b"})
    auth = {
        "tokensFile": str(tokens),
        "rules": [rule("*")],
        "quotas": {"maxLeasesPerIdentity": 2},
    }
    async with serving(auth=auth) as server, plain_channel(server) as channel:
        stub = LeaderElectionStub(channel)
        a = bearer("token-a")
        first, second, third = (uuid.uuid4().hex for _ in range(3))
        assert (await stub.try_acquire_lock(acquire(first, "w", ttl=30), metadata=a)).is_leader
        assert (await stub.try_acquire_lock(acquire(second, "w", ttl=30), metadata=a)).is_leader
        over = await refused(stub.try_acquire_lock(acquire(third, "w", ttl=30), metadata=a))
        assert over.code() == StatusCode.RESOURCE_EXHAUSTED
        assert "maxLeasesPerIdentity" in over.details()
        # A held lock is refreshed at the limit; another identity has its own quota.
        assert (await stub.try_acquire_lock(acquire(first, "w", ttl=30), metadata=a)).is_leader
        b = bearer("token-b")
        assert (await stub.try_acquire_lock(acquire(third, "w", ttl=30), metadata=b)).is_leader
        released = await stub.release_lock(pb.ReleaseLockRequest(**lock(first, "w")), metadata=a)
        assert released.released
        fourth = uuid.uuid4().hex
        assert (await stub.try_acquire_lock(acquire(fourth, "w", ttl=30), metadata=a)).is_leader


async def test_the_call_rate_quota_refuses_with_resource_exhausted(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"a": "token-a", "b": "token-b"})
    # One call per 1000 s: the second call comes sooner on any machine.
    auth = {
        "tokensFile": str(tokens),
        "rules": [rule("*")],
        "quotas": {"callsPerSecondPerIdentity": 0.001},
    }
    async with serving(auth=auth) as server, plain_channel(server) as channel:
        stub = LeaderElectionStub(channel)
        assert (
            await stub.try_acquire_lock(acquire("x", "w"), metadata=bearer("token-a"))
        ).is_leader
        over = await refused(stub.try_acquire_lock(acquire("x", "w"), metadata=bearer("token-a")))
        assert over.code() == StatusCode.RESOURCE_EXHAUSTED
        assert "callsPerSecondPerIdentity" in over.details()
        assert (
            await stub.try_acquire_lock(acquire("y", "w"), metadata=bearer("token-b"))
        ).is_leader


# -- status, health, reflection ---------------------------------------------------------


async def test_status_needs_admin_while_health_stays_open(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"ops": "token-ops", "app": "token-app"})
    rules = [rule("ops", "*", ("admin", "read")), rule("app", "*", ("lock",))]
    async with serving(auth={"tokensFile": str(tokens), "rules": rules}) as server:
        async with plain_channel(server) as channel:
            stub = LeaderElectionStub(channel)
            status = await stub.get_status(pb.GetStatusRequest(), metadata=bearer("token-ops"))
            assert status.version
            denied = await refused(
                stub.get_status(pb.GetStatusRequest(), metadata=bearer("token-app"))
            )
            assert denied.code() == StatusCode.PERMISSION_DENIED
            anonymous = await refused(stub.get_status(pb.GetStatusRequest()))
            assert anonymous.code() == StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest())
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_can_be_switched_off() -> None:
    async with serving(server={"reflection": False}) as server, plain_channel(server) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stub.ServerReflectionInfo(iter([request])):
                pass
        assert error.value.code() == StatusCode.UNIMPLEMENTED


# -- rotation while clients run -----------------------------------------------------------


async def keep_calling(stub: LeaderElectionStub, stop: asyncio.Event, **call: Any) -> int:
    """Acquire, renew, release a lock of its own until `stop`; the cycles completed.
    Any failure raises."""
    domain, cycles = uuid.uuid4().hex, 0
    while not stop.is_set():
        assert (await stub.try_acquire_lock(acquire(domain, "runner"), **call)).is_leader
        renewed = await stub.keep_alive(pb.KeepAliveRequest(**lock(domain, "runner")), **call)
        assert renewed.lease_length.total_seconds() > 0
        released = await stub.release_lock(pb.ReleaseLockRequest(**lock(domain, "runner")), **call)
        assert released.released
        cycles += 1
        await asyncio.sleep(0.01)
    return cycles


async def test_a_rotated_certificate_is_served_to_new_connections_while_clients_run(
    ca: Authority, records: list[dict[str, Any]]
) -> None:
    first = ca.issue("first", server=True, file_stem="server")
    client = ca.issue("app")
    tls = tls_config(first, ca)
    async with serving(server={"tls": tls}, auth={"rules": [rule("app")]}) as server:
        port = server.port
        assert await asyncio.to_thread(presented_certificate, port, ca, client) == "first"
        async with secure_channel(server, ca, client) as channel:
            stop = asyncio.Event()
            runner = asyncio.ensure_future(keep_calling(LeaderElectionStub(channel), stop))
            # A new pair, written one file at a time, as a rotation job would.
            ca.issue("second", server=True, file_stem="server")

            def rotated() -> bool:
                return presented_certificate(port, ca, client) == "second"

            await eventually(lambda: asyncio.to_thread(rotated), "the new certificate is served")
            # A broken pair (the key of another certificate): refused, the old one stays.
            broken = ca.issue("third", server=True, file_stem="third")
            first.cert_file.write_bytes(broken.cert_pem)
            await eventually(
                lambda: any("new TLS certificate rejected" in r["message"] for r in records),
                "the broken pair is refused",
            )
            assert await asyncio.to_thread(presented_certificate, port, ca, client) == "second"
            async with secure_channel(server, ca, client) as fresh:
                answer = await LeaderElectionStub(fresh).try_acquire_lock(acquire("new", "c"))
                assert answer.is_leader
            stop.set()
            assert await runner > 0  # the client running throughout never failed
    errors = [r for r in records if r["level"].name == "ERROR"]
    assert len(errors) == 1 and "is not the key of the certificate" in errors[0]["message"]
    assert "PRIVATE KEY" not in errors[0]["message"]


async def test_a_changed_tokens_file_applies_while_clients_run(
    tmp_path: Path, records: list[dict[str, Any]]
) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"a": "token-a1", "b": "token-b"})
    auth = {"tokensFile": str(tokens), "rules": [rule("*")]}
    async with serving(auth=auth) as server, plain_channel(server) as channel:
        stub = LeaderElectionStub(channel)
        stop = asyncio.Event()
        runner = asyncio.ensure_future(keep_calling(stub, stop, metadata=bearer("token-b")))
        assert (
            await stub.try_acquire_lock(acquire("x", "w"), metadata=bearer("token-a1"))
        ).is_leader
        digest = hashlib.sha256(b"token-a2").hexdigest()
        write_tokens(tokens, {"a": f"sha256:{digest}", "b": "token-b"})

        async def new_token_works() -> bool:
            try:
                await stub.get_leader(
                    pb.GetLeaderRequest(service="shared", domain="x"), metadata=bearer("token-a2")
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == StatusCode.UNAUTHENTICATED
                return False
            return True

        await eventually(new_token_works, "the new token is taken")
        old = await refused(
            stub.get_leader(
                pb.GetLeaderRequest(service="shared", domain="x"), metadata=bearer("token-a1")
            )
        )
        assert old.code() == StatusCode.UNAUTHENTICATED
        # A broken file: refused with an ERROR, the tokens in force stay.
        tokens.write_text("a: [broken\n")
        await eventually(
            lambda: any("tokens file change rejected" in r["message"] for r in records),
            "the broken file is refused",
        )
        leader = await stub.get_leader(
            pb.GetLeaderRequest(service="shared", domain="x"), metadata=bearer("token-a2")
        )
        assert leader.has_leader
        stop.set()
        assert await runner > 0


# -- audit ------------------------------------------------------------------------------


async def test_audit_lines_carry_the_identity_as_fields(
    tmp_path: Path, records: list[dict[str, Any]]
) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"alice": "token-alice"})
    auth = {"tokensFile": str(tokens), "rules": [rule("alice", "shared/*")]}
    domain = uuid.uuid4().hex
    async with serving(auth=auth) as server, plain_channel(server) as channel:
        stub = LeaderElectionStub(channel)
        alice = bearer("token-alice")
        assert (await stub.try_acquire_lock(acquire(domain, "w", ttl=30), metadata=alice)).is_leader
        await stub.release_lock(pb.ReleaseLockRequest(**lock(domain, "w")), metadata=alice)
        assert (await stub.try_acquire_lock(acquire(domain, "w", ttl=30), metadata=alice)).is_leader
        # The store forgets the lease while this instance still counts it live.
        holder = f"alice{HOLDER_SEPARATOR}w"
        assert await server.runtime.current.store.release(LockKey("shared", domain), holder, 0)
        await stub.keep_alive(pb.KeepAliveRequest(**lock(domain, "w")), metadata=alice)
        await refused(stub.try_acquire_lock(acquire(domain, "w", "other"), metadata=alice))
    audit = {r["extra"]["audit"]: r for r in records if "audit" in r["extra"]}
    assert set(audit) == {"grant", "release", "lost", "refused"}
    for event, record in audit.items():
        assert record["extra"]["identity"] == "alice", event
        assert record["level"].name == "INFO", event
        assert "alice" in record["message"], event
    assert audit["grant"]["extra"]["domain"] == domain
    assert "token-alice" not in " ".join(r["message"] for r in records)


# -- the command ------------------------------------------------------------------------


def start_service(config: dict[str, Any], workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run the command with `config` until it exits (it is expected to refuse to start)."""
    file = workdir / "config.yaml"
    file.write_text(yaml.safe_dump({"serverAddress": f"127.0.0.1:{free_port()}", **config}))
    return subprocess.run(
        [sys.executable, "-m", "quorum_quest.cli", f"-config={file}"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "case",
    ["expired", "key of another certificate", "missing file", "secret in a broken token file"],
)
def test_unusable_files_at_start_exit_2_naming_the_key(
    ca: Authority, server_cert: Issued, tmp_path: Path, case: str
) -> None:
    tls = tls_config(server_cert)
    auth: dict[str, Any] = {}
    if case == "expired":
        tls = tls_config(ca.issue("old", server=True, expired=True))
        key = "server.tls.certFile"
    elif case == "key of another certificate":
        tls["keyFile"] = str(ca.issue("other", server=True).key_file)
        key = "server.tls.keyFile"
    elif case == "missing file":
        tls["clientCaFile"] = str(tmp_path / "missing-ca.crt")
        key = "server.tls.clientCaFile"
    else:
        broken = tmp_path / "tokens.yaml"
        broken.write_text("alice: hunter2-secret\nbob: [hunter3-secret\n")
        auth = {"tokensFile": str(broken)}
        key = "auth.tokensFile"
    result = start_service({"server": {"tls": tls}, "auth": auth}, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"quorum-quest-service: config error: {key}:")
    assert "secret" not in result.stderr and "PRIVATE KEY" not in result.stderr


# -- the Prometheus endpoint ------------------------------------------------------------


async def test_prometheus_binds_the_host_the_service_listens_on() -> None:
    port = free_port()
    async with serving(observability={"prometheusPort": port}) as server:
        assert server._metrics_server.server_address[:2] == ("127.0.0.1", port)
    port = free_port()
    observability = {"prometheusPort": port, "prometheusAddress": "0.0.0.0"}
    async with serving(observability=observability) as server:
        assert server._metrics_server.server_address[:2] == ("0.0.0.0", port)


# -- reloads ----------------------------------------------------------------------------


async def test_a_reload_turns_auth_on_and_a_bad_tokens_file_is_rejected(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"a": "token-a"})
    async with serving() as server, plain_channel(server) as channel:
        stub = LeaderElectionStub(channel)
        assert (await stub.try_acquire_lock(acquire("x", "w"))).is_leader  # auth off: open
        auth = {"tokensFile": str(tokens), "rules": [rule("a")]}
        assert await server.apply(make_settings("memory", {}, auth=auth))
        anonymous = await refused(stub.try_acquire_lock(acquire("y", "w")))
        assert anonymous.code() == StatusCode.UNAUTHENTICATED
        assert (
            await stub.try_acquire_lock(acquire("y", "w"), metadata=bearer("token-a"))
        ).is_leader
        missing = {"tokensFile": str(tmp_path / "nowhere.yaml"), "rules": [rule("*")]}
        assert not await server.apply(make_settings("memory", {}, auth=missing))
        assert server.runtime.last_reload.startswith("rejected: auth.tokensFile: cannot read")
        assert (
            await stub.try_acquire_lock(acquire("z", "w"), metadata=bearer("token-a"))
        ).is_leader
