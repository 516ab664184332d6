"""The Session stream: lock operations over one stream, on the wire and through the SDK."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from quorum_quest import QuorumQuestClient
from quorum_quest._rpc import SERVICE_NAME, LeaderElectionStub, wire
from quorum_quest.errors import ServiceUnavailable
from quorum_quest.server import LockServer, running_server
from tests.backends.redis import RedisProcess
from tests.conftest import make_settings

OK = grpc.StatusCode.OK.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
MEMORY_ONLY = pytest.mark.parametrize("store_variant", ["memory"], indirect=True)


def lock_name() -> str:
    return f"dom-{uuid.uuid4().hex[:8]}"


class RawSession:
    """A `Session` call through the raw stub: send operations, collect results by id."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.results: dict[int, Any] = {}
        self.answers = 0  # results read, a repeated id counted again

    async def send(self, *operations: dict[str, Any]) -> None:
        await self.call.write(wire.SessionRequest(operations=list(operations)))

    async def results_of(self, *ids: int) -> list[Any]:
        while not all(id in self.results for id in ids):
            response = await self.call.read()
            assert response is not grpc.aio.EOF, "the session ended"
            for result in response.results:
                self.answers += 1
                self.results[result.id] = result
        return [self.results.pop(id) for id in ids]

    async def ask(self, operation: dict[str, Any]) -> Any:
        id = operation["id"]
        await self.send(operation)
        (result,) = await self.results_of(id)
        return result


@asynccontextmanager
async def raw_session(
    address: str, metadata: tuple[tuple[str, str], ...] | None = None
) -> AsyncIterator[RawSession]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = LeaderElectionStub(channel, wire).session(metadata=metadata)
        try:
            yield RawSession(call)
        finally:
            call.cancel()


def lock(domain: str, client_id: str = "alice", service: str = "svc") -> dict[str, str]:
    return {"service": service, "domain": domain, "client_id": client_id}


async def test_a_session_serves_each_operation_as_its_unary_call(address: str) -> None:
    domain = lock_name()
    async with raw_session(address) as session:
        granted = await session.ask({"id": 1, "try_acquire_lock": {**lock(domain), "ttl": 5}})
        assert granted.code == OK, granted.message
        assert granted.try_acquire_lock.is_leader
        token = granted.try_acquire_lock.fencing_token
        assert token > 0
        assert granted.try_acquire_lock.lease_length.ToMilliseconds() == 5000

        refused = await session.ask({"id": 2, "try_acquire_lock": lock(domain, "bob")})
        assert refused.code == OK and not refused.try_acquire_lock.is_leader
        assert refused.try_acquire_lock.leader_id == "alice"

        await session.send(
            {"id": 3, "keep_alive": {**lock(domain), "ttl": 5}},
            {"id": 4, "get_leader": {"service": "svc", "domain": domain}},
            {"id": 5, "keep_alive": lock(domain, "bob")},
        )
        renewed, leader, not_holder = await session.results_of(3, 4, 5)
        assert renewed.code == OK and renewed.keep_alive.fencing_token == token
        assert leader.get_leader.has_leader and leader.get_leader.client_id == "alice"
        assert leader.get_leader.fencing_token == token
        assert not_holder.keep_alive.lease_length.ToMilliseconds() == -1000

        released = await session.ask(
            {"id": 6, "release_lock": {**lock(domain), "fencing_token": token}}
        )
        assert released.code == OK and released.release_lock.released
        free = await session.ask({"id": 7, "get_leader": {"service": "svc", "domain": domain}})
        assert not free.get_leader.has_leader
        again = await session.ask({"id": 8, "try_acquire_lock": lock(domain, "bob")})
        assert again.try_acquire_lock.fencing_token > token  # tokens only go up


@MEMORY_ONLY
async def test_the_operations_of_one_message_each_get_one_result_and_fail_alone(
    address: str,
) -> None:
    domains = [lock_name() for _ in range(20)]
    async with raw_session(address) as session:
        await session.send(
            *({"id": n, "try_acquire_lock": lock(d)} for n, d in enumerate(domains, 1)),
            {"id": 100, "try_acquire_lock": lock("")},
            {"id": 101, "release_lock": {**lock(lock_name()), "client_id": "a\nb"}},
            {"id": 102},
        )
        *granted, empty, control, nothing = await session.results_of(*range(1, 21), 100, 101, 102)
        assert all(r.code == OK and r.try_acquire_lock.is_leader for r in granted)
        assert (empty.code, empty.message.split(":")[0]) == (INVALID_ARGUMENT, "domain")
        assert (control.code, control.message.split(":")[0]) == (INVALID_ARGUMENT, "client_id")
        assert (nothing.code, nothing.message.split(":")[0]) == (INVALID_ARGUMENT, "operation")
        # The stream goes on after refusals, and no operation was answered twice.
        after = await session.ask({"id": 103, "get_leader": {"service": "svc", "domain": "x"}})
        assert after.code == OK
        assert session.answers == 24


@MEMORY_ONLY
async def test_an_operations_deadline_bounds_its_wait_for_a_release(address: str) -> None:
    """A waiting acquire answers before its own deadline, as a unary call's: without the
    deadline it would wait the whole 60 s it asked for."""
    domain = lock_name()
    async with raw_session(address) as session:
        held = await session.ask({"id": 1, "try_acquire_lock": {**lock(domain, "bob"), "ttl": 60}})
        assert held.try_acquire_lock.is_leader
        waited = await session.ask(
            {
                "id": 2,
                "deadline_ms": 3000,
                "try_acquire_lock": {**lock(domain), "wait_ms": 60_000},
            }
        )
        # Either way the wait ended by the deadline: answered before it (the service
        # stops waiting a little early), or, on a machine that stalled just then, at it.
        assert waited.code in (OK, DEADLINE_EXCEEDED), waited.message
        if waited.code == OK:
            assert not waited.try_acquire_lock.is_leader
            assert waited.try_acquire_lock.leader_id == "bob"
            assert 0 < waited.try_acquire_lock.waited.ToMilliseconds() < 3000


# -- auth ---------------------------------------------------------------------------------


def write_tokens(path: Path, tokens: dict[str, str]) -> str:
    path.write_text(yaml.safe_dump(tokens))
    return str(path)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_a_session_is_authenticated_and_each_operation_authorized(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", {"alice": "alice-token", "bob": "bob-token"})
    rules = [
        {"identity": "alice", "locks": "billing/*", "allow": ["lock", "read"]},
        {"identity": "bob", "locks": "*", "allow": ["lock", "read"]},
    ]
    settings = make_settings("memory", {}, auth={"tokensFile": tokens, "rules": rules})
    async with running_server(settings) as server:
        address = f"127.0.0.1:{server.port}"
        async with raw_session(address, bearer("no-such-token")) as stranger:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stranger.ask({"id": 1, "get_leader": {"service": "billing", "domain": "x"}})
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "no-such-token" not in (refused.value.details() or "")
        domain = lock_name()
        async with (
            raw_session(address, bearer("alice-token")) as alice,
            raw_session(address, bearer("bob-token")) as bob,
        ):
            granted = await alice.ask(
                {"id": 1, "try_acquire_lock": lock(domain, service="billing")}
            )
            assert granted.code == OK and granted.try_acquire_lock.is_leader
            denied = await alice.ask({"id": 2, "try_acquire_lock": lock(domain, service="other")})
            assert denied.code == PERMISSION_DENIED
            assert "other/" in denied.message
            # The lease is alice's identity's: bob naming her client_id neither renews
            # nor releases it.
            renewal = await bob.ask({"id": 1, "keep_alive": lock(domain, service="billing")})
            assert renewal.keep_alive.lease_length.ToMilliseconds() == -1000
            release = await bob.ask({"id": 2, "release_lock": lock(domain, service="billing")})
            assert release.code == PERMISSION_DENIED
            leader = await alice.ask(
                {"id": 3, "get_leader": {"service": "billing", "domain": domain}}
            )
            assert leader.get_leader.has_leader
            assert leader.get_leader.fencing_token == granted.try_acquire_lock.fencing_token


# -- the SDK ------------------------------------------------------------------------------


@MEMORY_ONLY
async def test_the_sdks_clients_share_one_session(server: LockServer, address: str) -> None:
    clients = [QuorumQuestClient("svc", lock_name(), 5, address, session=True) for _ in range(3)]
    try:
        assert all(await asyncio.gather(*(c.try_acquire_lock() for c in clients)))
        assert len(server.runtime.sessions) == 1
        assert all(await asyncio.gather(*(c.release_lock() for c in clients)))
    finally:
        for client in clients:
            await client.close()
    async with asyncio.timeout(30):  # the service sees the stream end a moment later
        while len(server.runtime.sessions):
            await asyncio.sleep(0.05)


DEFAULT_CLIENT = """
import asyncio, sys
from quorum_quest import QuorumQuestClient

async def main() -> None:
    async with QuorumQuestClient("svc", "default-session", 5, sys.argv[1]) as client:
        assert await client.try_acquire_lock()
        print("acquired", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""


@MEMORY_ONLY
async def test_an_application_that_traces_nothing_gets_the_session_by_default(
    server: LockServer, address: str
) -> None:
    """In a process of its own: OpenTelemetry set up by another test of this process
    would make the default unary calls (each with its span)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DEFAULT_CLIENT,
        address,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert await process.stdout.readline() == b"acquired\n"
        assert len(server.runtime.sessions) == 1
    finally:
        process.stdin.write(b"done\n")
        await process.stdin.drain()
        assert await process.wait() == 0


@asynccontextmanager
async def original_contract_server(upstream: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A service of the original contract (the four unary lock calls, no `Session`),
    answering through `upstream`; yields its address and the methods it was called on."""
    called: list[str] = []
    channel = grpc.aio.insecure_channel(upstream)

    def forward(name: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        upstream_call = channel.unary_unary(f"/{SERVICE_NAME}/{name}")

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            called.append(name)
            answer: bytes = await upstream_call(request)
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    names = ("TryAcquireLock", "ReleaseLock", "KeepAlive", "GetLeader")
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {n: forward(n) for n in names})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", called
    finally:
        await server.stop(0)
        await channel.close()


@MEMORY_ONLY
async def test_the_sdk_uses_unary_calls_against_a_service_without_sessions(
    server: LockServer, address: str
) -> None:
    async with original_contract_server(address) as (original, called):
        async with QuorumQuestClient("svc", lock_name(), 5, original, session=True) as client:
            assert await client.try_acquire_lock()
            assert await client.get_leader() is not None
            assert await client.release_lock()
        assert called == ["TryAcquireLock", "GetLeader", "ReleaseLock"]


async def test_an_operation_whose_answer_the_stream_lost_is_uncertain_never_a_success() -> None:
    """The service stops while an acquire is in its store (a paused Redis): the stream
    ends without its answer, and the SDK says so instead of reporting either outcome."""
    with RedisProcess() as redis_server:
        settings = make_settings(
            "redis", {"url": redis_server.url, "timeout": 30}, server={"shutdownGrace": 0.2}
        )
        server = LockServer(settings)
        await server.start()
        client = QuorumQuestClient(
            "svc", lock_name(), 5, f"127.0.0.1:{server.port}", rpc_timeout=60, session=True
        )
        try:
            assert await client.get_leader() is None  # the session is open
            redis_server.pause()
            acquire = asyncio.ensure_future(client.try_acquire_lock())
            while not server.runtime.current.in_flight:
                await asyncio.sleep(0.01)
            await server.stop()
            with pytest.raises(ServiceUnavailable, match="outcome is unknown"):
                await acquire
            assert not client.is_leader
        finally:
            redis_server.resume()
            await client.close()


async def test_at_shutdown_a_session_answers_what_it_runs_then_ends_unavailable() -> None:
    server = LockServer(make_settings("memory", {}))
    await server.start()
    address = f"127.0.0.1:{server.port}"
    domain = lock_name()
    try:
        async with raw_session(address) as session:
            held = await session.ask({"id": 1, "try_acquire_lock": {**lock(domain, "bob")}})
            assert held.try_acquire_lock.is_leader
            await session.send({"id": 2, "try_acquire_lock": {**lock(domain), "wait_ms": 60_000}})
            while not server.runtime.current.in_flight:  # the acquire waits for a release
                await asyncio.sleep(0.01)
            await server.stop()
            (waited,) = await session.results_of(2)
            assert waited.code == OK and not waited.try_acquire_lock.is_leader
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await session.results_of(3)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (ended.value.details() or "")
    finally:
        if server.runtime.sessions.closed is False:
            await server.stop()


@MEMORY_ONLY
async def test_bytes_that_are_no_session_request_end_the_stream_invalid_argument(
    address: str,
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(f"/{SERVICE_NAME}/Session")()
        await call.write(b"\xff\xff\xff garbage")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "SessionRequest" in (refused.value.details() or "")


@MEMORY_ONLY
async def test_an_id_of_an_operation_still_running_is_refused_naming_the_id(
    address: str,
) -> None:
    domain = lock_name()
    async with raw_session(address) as session:
        held = await session.ask({"id": 1, "try_acquire_lock": lock(domain, "bob")})
        assert held.try_acquire_lock.is_leader
        waiting = {
            "id": 2,
            "deadline_ms": 2000,
            "try_acquire_lock": {**lock(domain), "wait_ms": 60_000},
        }
        await session.send(waiting, {"id": 2, "get_leader": {"service": "svc", "domain": domain}})
        answers: list[Any] = []  # both carry id 2: read in order, not by id
        while len(answers) < 2:
            response = await session.call.read()
            assert response is not grpc.aio.EOF, "the session ended"
            answers.extend(response.results)
        refused, waited = answers  # the refusal is answered at once, the wait later
        assert refused.code == INVALID_ARGUMENT
        assert refused.message.startswith("id: 2 ")
        assert waited.code in (OK, DEADLINE_EXCEEDED)
