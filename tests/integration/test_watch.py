"""WatchLeaders and the SDK's `client.watch()`: the current leader, then every change.

Servers run in-process on the memory store and on a real Redis (started as a process
by `tests/backends/redis.py`). Nothing is judged by speed: every wait has a generous
bound, and expiry "within a bounded delay" is asserted as eventually reported.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
import yaml

from quorum_quest import Callbacks, LeaderChange, QuorumQuestClient
from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.errors import PermissionDenied
from quorum_quest.server import LockServer, running_server
from quorum_quest.stores import LockKey
from tests.backends import free_port
from tests.conftest import make_settings

# Generous: the suite must pass on a loaded 2-core machine.
BUDGET_S = 30.0
Kind = pb.LeaderChangeKind

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


# And a store the watch polls (every `server.watchInterval`, shortened here).
POLLED = [
    *BACKENDS,
    pytest.param("dynamodb-moto", id="dynamodb-moto", marks=pytest.mark.dynamodb),
    pytest.param("scylladb", id="scylladb", marks=pytest.mark.scylladb),
]


def _backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if request.param == "memory":
        return "memory", {}
    config = request.getfixturevalue(f"{request.param.replace('-', '_')}_store_config")
    return request.param.partition("-")[0], config


@pytest.fixture(params=BACKENDS)
def watched_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return _backend(request)


@pytest.fixture(params=POLLED)
def any_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return _backend(request)


@asynccontextmanager
async def serving(
    backend: str, store: dict[str, Any], **overrides: Any
) -> AsyncIterator[LockServer]:
    async with running_server(make_settings(backend, store, **overrides)) as server:
        yield server


@asynccontextmanager
async def stub_of(server: LockServer) -> AsyncIterator[LeaderElectionStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield LeaderElectionStub(channel)


class Stream:
    """A WatchLeaders stream read into a queue by a task of its own."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.events: asyncio.Queue[pb.LeaderChange] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for event in self.call:
            await self.events.put(event)

    async def next(self) -> pb.LeaderChange:
        async with asyncio.timeout(BUDGET_S):
            return await self.events.get()

    async def ended(self) -> grpc.StatusCode:
        """The status the stream ended with."""
        async with asyncio.timeout(BUDGET_S):
            try:
                await self.task
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


def watch(stub: LeaderElectionStub, *domains: str, service: str = "svc", **request: Any) -> Stream:
    locks = [pb.LockRef(service=service, domain=domain) for domain in domains]
    return Stream(stub.watch_leaders(pb.WatchLeadersRequest(locks=locks, **request)))


def acquire(stub: LeaderElectionStub, domain: str, client_id: str, ttl_ms: int) -> Any:
    return stub.try_acquire_lock(
        pb.TryAcquireLockRequest(service="svc", domain=domain, client_id=client_id, ttl_ms=ttl_ms)
    )


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def test_a_scripted_sequence_is_seen_in_order_with_rising_tokens(
    any_backend: tuple[str, dict[str, Any]],
) -> None:
    backend, store = any_backend
    domain = unique("scripted")
    fast_polls = {"server": {"watchInterval": 0.1}}
    async with serving(backend, store, **fast_polls) as server, stub_of(server) as stub:
        stream = watch(stub, domain)
        try:
            first = await stream.next()
            assert (first.kind, first.client_id, first.fencing_token) == (Kind.CURRENT, "", 0)

            granted = await acquire(stub, domain, "a", 30_000)
            event = await stream.next()
            assert (event.kind, event.client_id) == (Kind.GRANTED, "a")
            assert event.fencing_token == granted.fencing_token
            assert event.remaining.total_seconds() > 0

            # A renewal is no change; the release right after it is the next event.
            renewed = await stub.keep_alive(
                pb.KeepAliveRequest(service="svc", domain=domain, client_id="a", ttl_ms=30_000)
            )
            assert renewed.lease_length.total_seconds() > 0
            await stub.release_lock(
                pb.ReleaseLockRequest(service="svc", domain=domain, client_id="a")
            )
            event = await stream.next()
            assert (event.kind, event.client_id, event.fencing_token) == (Kind.RELEASED, "", 0)

            # Expires, never released. A polled store sees the grant only if a poll
            # falls within the lease: give it 50 polls' worth, however slow the store.
            polled = backend in ("scylladb", "dynamodb")
            second = await acquire(stub, domain, "b", 5_000 if polled else 300)
            assert second.fencing_token > granted.fencing_token
            event = await stream.next()
            assert (event.kind, event.client_id) == (Kind.GRANTED, "b")
            assert event.fencing_token == second.fencing_token
            event = await stream.next()
            assert (event.kind, event.client_id, event.fencing_token) == (Kind.EXPIRED, "", 0)
            assert not any(e.gap for e in [first, event])
            assert stream.events.empty()
        finally:
            stream.close()


async def test_many_locks_and_a_whole_service_on_one_stream(
    watched_backend: tuple[str, dict[str, Any]],
) -> None:
    backend, store = watched_backend
    service = unique("fleet")
    domains = [f"shard-{n}" for n in range(200)]
    async with serving(backend, store) as server, stub_of(server) as stub:
        held_before = await stub.try_acquire_lock(
            pb.TryAcquireLockRequest(service=service, domain="early", client_id="x", ttl_ms=30_000)
        )
        listed = watch(stub, *domains, service=service)
        whole = Stream(stub.watch_leaders(pb.WatchLeadersRequest(service=service)))
        try:
            currents = {(await listed.next()).domain for _ in domains}
            assert currents == set(domains)
            early = await whole.next()
            assert (early.kind, early.domain, early.fencing_token) == (
                Kind.CURRENT,
                "early",
                held_before.fencing_token,
            )
            tokens = {}
            for domain in domains:
                answer = await stub.try_acquire_lock(
                    pb.TryAcquireLockRequest(
                        service=service, domain=domain, client_id="y", ttl_ms=30_000
                    )
                )
                tokens[domain] = answer.fencing_token
            for stream in (listed, whole):
                seen = {}
                while len(seen) < len(domains):
                    event = await stream.next()
                    assert event.kind == Kind.GRANTED
                    seen[event.domain] = event.fencing_token
                assert seen == tokens
        finally:
            listed.close()
            whole.close()


async def test_a_slow_reader_gets_the_latest_state_with_a_gap() -> None:
    """Changes made while nobody reads are coalesced per lock: the reader is not sent
    each step, but the latest state, marked as a gap."""
    domain = unique("slow")
    async with serving("memory", {}) as server, stub_of(server) as stub:
        hub = server.runtime.watches
        opened = await hub.open([LockKey("svc", domain)], None, {}, lambda key: True)
        try:
            last = None
            for n in range(50):
                last = await acquire(stub, domain, f"c{n}", 30_000)
                await stub.release_lock(
                    pb.ReleaseLockRequest(service="svc", domain=domain, client_id=f"c{n}")
                )
            last = await acquire(stub, domain, "final", 30_000)
            changes = opened.changes()
            async with asyncio.timeout(BUDGET_S):
                current = await anext(changes)
            assert current.kind in ("current", "granted")
            assert (current.holder, current.token) == ("final", last.fencing_token)
            assert current.gap  # the steps in between were dropped
        finally:
            hub.leave(opened)


async def test_shutdown_ends_the_stream_with_unavailable() -> None:
    async with serving("memory", {}) as server, stub_of(server) as stub:
        stream = watch(stub, unique("shutdown"))
        await stream.next()
        stop = asyncio.ensure_future(server.stop())
        assert await stream.ended() == grpc.StatusCode.UNAVAILABLE
        await stop


async def test_a_watch_of_locks_the_rules_do_not_let_it_read_is_permission_denied(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"reader": "reader-secret"}))
    auth = {
        "tokensFile": str(tokens),
        "rules": [{"identity": "reader", "locks": "open/*", "allow": ["read"]}],
    }
    metadata = (("authorization", "Bearer reader-secret"),)
    async with serving("memory", {}, auth=auth) as server, stub_of(server) as stub:
        for request in (
            pb.WatchLeadersRequest(locks=[pb.LockRef(service="secret", domain="d")]),
            pb.WatchLeadersRequest(service="secret"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.watch_leaders(request, metadata=metadata):
                    pass
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        allowed = Stream(
            stub.watch_leaders(
                pb.WatchLeadersRequest(locks=[pb.LockRef(service="open", domain="d")]),
                metadata=metadata,
            )
        )
        try:
            assert (await allowed.next()).kind == Kind.CURRENT
        finally:
            allowed.close()

        client = QuorumQuestClient(
            "secret", "d", 10, f"127.0.0.1:{server.port}", token="reader-secret"
        )
        async with client:
            with pytest.raises(PermissionDenied):
                async for _ in client.watch():
                    pass


async def test_a_watch_of_a_service_reports_only_the_locks_the_rules_let_it_read(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"reader": "reader-secret", "writer": "writer-secret"}))
    auth = {
        "tokensFile": str(tokens),
        "rules": [
            {"identity": "reader", "locks": "mixed/open-*", "allow": ["read"]},
            {"identity": "writer", "locks": "*", "allow": ["lock"]},
        ],
    }
    reader = (("authorization", "Bearer reader-secret"),)
    writer = (("authorization", "Bearer writer-secret"),)
    async with serving("memory", {}, auth=auth) as server, stub_of(server) as stub:

        async def take(domain: str) -> None:
            request = pb.TryAcquireLockRequest(
                service="mixed", domain=domain, client_id="w", ttl_ms=30_000
            )
            assert (await stub.try_acquire_lock(request, metadata=writer)).is_leader

        await take("open-1")
        await take("secret-1")
        stream = Stream(
            stub.watch_leaders(pb.WatchLeadersRequest(service="mixed"), metadata=reader)
        )
        try:
            first = await stream.next()
            assert (first.kind, first.domain) == (Kind.CURRENT, "open-1")
            await take("secret-2")
            await take("open-2")
            event = await stream.next()
            assert (event.kind, event.domain) == (Kind.GRANTED, "open-2")
            assert stream.events.empty()
        finally:
            stream.close()


# -- across service instances (Redis) --------------------------------------------------


@pytest.mark.redis
async def test_a_change_through_another_instance_is_seen(
    redis_store_config: dict[str, Any],
) -> None:
    domain = unique("elsewhere")
    async with (
        serving("redis", redis_store_config) as watched,
        serving("redis", redis_store_config) as other,
        stub_of(watched) as watching,
        stub_of(other) as changing,
    ):
        stream = watch(watching, domain)
        try:
            assert (await stream.next()).kind == Kind.CURRENT
            granted = await acquire(changing, domain, "far", 30_000)
            event = await stream.next()
            assert (event.kind, event.client_id, event.fencing_token) == (
                Kind.GRANTED,
                "far",
                granted.fencing_token,
            )
            await changing.release_lock(
                pb.ReleaseLockRequest(service="svc", domain=domain, client_id="far")
            )
            assert (await stream.next()).kind == Kind.RELEASED
        finally:
            stream.close()


@pytest.mark.redis
async def test_changes_missed_while_the_subscription_was_lost_come_with_a_gap(
    redis_store_config: dict[str, Any],
) -> None:
    domain = unique("resync")
    admin = aioredis.Redis.from_url(redis_store_config["url"])
    async with serving("redis", redis_store_config) as server, stub_of(server) as stub:
        stream = watch(stub, domain)
        try:
            await stream.next()
            a = await acquire(stub, domain, "a", 30_000)
            assert (await stream.next()).fencing_token == a.fencing_token
            # Every subscriber loses its connection; what is published meanwhile is lost.
            await admin.client_kill_filter(_type="pubsub")
            await stub.release_lock(
                pb.ReleaseLockRequest(service="svc", domain=domain, client_id="a")
            )
            b = await acquire(stub, domain, "b", 30_000)
            event = await stream.next()
            assert (event.kind, event.client_id, event.fencing_token) == (
                Kind.GRANTED,
                "b",
                b.fencing_token,
            )
            assert event.gap  # a's release was never heard
        finally:
            stream.close()
            await admin.aclose()


@pytest.mark.redis
async def test_the_sdk_watch_resumes_after_a_shutdown_without_missing_a_change(
    redis_store_config: dict[str, Any],
) -> None:
    """The instance the SDK watches through shuts down; meanwhile the lock changes hands
    through another. When the instance is back, the watch has resumed by itself and
    reports the new holder: no change is missed."""
    domain = unique("resume")
    port = free_port()
    settings = {"serverAddress": f"127.0.0.1:{port}"}
    changes: asyncio.Queue[LeaderChange] = asyncio.Queue()

    async def next_change() -> LeaderChange:
        async with asyncio.timeout(BUDGET_S):
            return await changes.get()

    client = QuorumQuestClient("svc", domain, 10, f"127.0.0.1:{port}")

    async def follow() -> None:
        async for change in client.watch():
            await changes.put(change)

    async with serving("redis", redis_store_config) as other, stub_of(other) as stub:
        first = LockServer(make_settings("redis", redis_store_config, **settings))
        await first.start()
        follower = asyncio.ensure_future(follow())
        try:
            assert (await next_change()).kind == "current"
            a = await acquire(stub, domain, "a", 30_000)
            change = await next_change()
            assert (change.kind, change.client_id, change.fencing_token) == (
                "granted",
                "a",
                a.fencing_token,
            )
            await first.stop()
            await stub.release_lock(
                pb.ReleaseLockRequest(service="svc", domain=domain, client_id="a")
            )
            b = await acquire(stub, domain, "b", 30_000)
            async with serving("redis", redis_store_config, **settings):
                change = await next_change()
                assert (change.client_id, change.fencing_token) == ("b", b.fencing_token)
                assert change.fencing_token > a.fencing_token
                assert change.gap  # the release of a's lease happened while away
                await stub.release_lock(
                    pb.ReleaseLockRequest(service="svc", domain=domain, client_id="b")
                )
                change = await next_change()
                assert (change.kind, change.client_id) == ("released", "")
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await client.close()


async def test_on_new_leader_is_called_only_inside_watching() -> None:
    domain = unique("callback")
    leaders: list[tuple[str, str]] = []
    async with serving("memory", {}) as server, stub_of(server) as stub:
        client = QuorumQuestClient(
            "svc",
            domain,
            10,
            f"127.0.0.1:{server.port}",
            callbacks=Callbacks(on_new_leader=lambda c: leaders.append((c.kind, c.client_id))),
        )
        async with client:
            async with client.watching():
                async with asyncio.timeout(BUDGET_S):
                    while not leaders:
                        await asyncio.sleep(0.01)
                await acquire(stub, domain, "a", 30_000)
                async with asyncio.timeout(BUDGET_S):
                    while len(leaders) < 2:
                        await asyncio.sleep(0.01)
            assert leaders == [("current", ""), ("granted", "a")]
            await stub.release_lock(
                pb.ReleaseLockRequest(service="svc", domain=domain, client_id="a")
            )
            await asyncio.sleep(0.2)
            assert len(leaders) == 2  # the block is over: nothing watches any more
            assert len(server.runtime.watches._by_key) == 0


async def test_the_sdk_watch_ends_when_the_client_is_closed() -> None:
    async with serving("memory", {}) as server:
        client = QuorumQuestClient("svc", unique("closed"), 10, f"127.0.0.1:{server.port}")
        changes = client.watch()
        async with asyncio.timeout(BUDGET_S):
            assert (await anext(changes)).kind == "current"
            closing = asyncio.ensure_future(client.close())
            with pytest.raises(StopAsyncIteration):
                await anext(changes)
            await closing
