"""Batched renewals: the KeepAliveMany RPC and the SDK's `leaderships()` on a real server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import grpc
import pytest
from loguru import logger

from quorum_quest import Callbacks, InvalidArgument, Lease, LeaseSet, QuorumQuestClient
from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.errors import StoreUnavailable
from quorum_quest.server import LockServer, running_server
from quorum_quest.stores import LockKey
from tests.backends.redis import RedisProcess
from tests.conftest import make_settings

# The SDK tests lean on timing: run them where renewals are fast (the RPC tests run on all).
FAST_STORES = pytest.mark.parametrize(
    "store_variant", ["memory", pytest.param("redis", marks=pytest.mark.redis)]
)
MEMORY_ONLY = pytest.mark.parametrize("store_variant", ["memory"])


@pytest.fixture
async def stub(address: str):
    async with grpc.aio.insecure_channel(address) as channel:
        yield LeaderElectionStub(channel)


def service_name() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


def refs(service: str, count: int) -> list[pb.LockRef]:
    return [pb.LockRef(service=service, domain=f"shard-{n}") for n in range(count)]


async def acquire(stub: LeaderElectionStub, ref: pb.LockRef, client_id: str) -> int:
    answer = await stub.try_acquire_lock(
        pb.TryAcquireLockRequest(
            service=ref.service, domain=ref.domain, client_id=client_id, ttl=30
        )
    )
    assert answer.is_leader
    return answer.fencing_token


# -- the RPC ------------------------------------------------------------------------------


async def test_keep_alive_many_answers_each_lock_in_request_order(
    stub: LeaderElectionStub,
) -> None:
    mine = refs(service_name(), 3)
    theirs, free = refs(service_name(), 2)
    tokens = [await acquire(stub, ref, "alice") for ref in mine]
    await acquire(stub, theirs, "bob")
    answer = await stub.keep_alive_many(
        pb.KeepAliveManyRequest(client_id="alice", locks=[*mine, theirs, free], ttl=20)
    )
    assert answer.lease_length == timedelta(seconds=20)
    assert answer.fencing_tokens == [*tokens, 0, 0]
    leader = await stub.get_leader(pb.GetLeaderRequest(service=theirs.service, domain="shard-0"))
    assert leader.client_id == "bob"


@MEMORY_ONLY
async def test_keep_alive_many_of_no_locks_is_ok_and_empty(stub: LeaderElectionStub) -> None:
    answer = await stub.keep_alive_many(pb.KeepAliveManyRequest(client_id="alice", ttl_ms=500))
    assert answer.fencing_tokens == []
    assert answer.lease_length == timedelta(milliseconds=500)


@MEMORY_ONLY
@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"client_id": ""}, "client_id: must not be empty"),
        (
            {"locks": [*refs("svc", 3), pb.LockRef(service="svc")]},
            "locks[3].domain: must not be empty",
        ),
        (
            {"locks": [pb.LockRef(service="s" * 257, domain="d")]},
            "locks[0].service: must be at most",
        ),
        ({"locks": refs("svc", 10_001)}, "locks: at most 10000 per call, got 10001"),
    ],
)
async def test_bad_keep_alive_many_is_invalid_argument_naming_the_field(
    stub: LeaderElectionStub, request_fields: dict, message: str
) -> None:
    request = pb.KeepAliveManyRequest(
        **{"client_id": "alice", "locks": refs("svc", 2), **request_fields}
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.keep_alive_many(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(message)


@MEMORY_ONLY
async def test_keep_alive_many_counts_and_books_each_lock_and_logs_one_line(
    server: LockServer, stub: LeaderElectionStub
) -> None:
    service = service_name()
    mine, never_held = refs(service, 40), refs(service_name(), 5)
    for ref in mine:
        await acquire(stub, ref, "alice")
    # 25 of alice's leases end behind this instance's back.
    for ref in mine[15:]:
        assert await server.runtime.current.store.release(LockKey(ref.service, ref.domain), "alice")
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO")
    try:
        await stub.keep_alive_many(
            pb.KeepAliveManyRequest(client_id="alice", locks=[*mine, *never_held], ttl=20)
        )
    finally:
        logger.remove(sink)
    counts = server.runtime.current.telemetry.operation_counts()
    assert counts[("keep_alive_many", "renewed", "memory")] == 15
    assert counts[("keep_alive_many", "not_holder", "memory")] == 30
    status = await stub.get_status(pb.GetStatusRequest())
    assert status.held_leases == 15
    # One line for the leases alice lost; none for locks she never held.
    [line] = [line for line in lines if "keep-alive refused" in line]
    assert "25 of 45 locks" in line and "client_id=alice" in line and "and 20 more" in line


@pytest.mark.redis
async def test_keep_alive_many_when_the_store_is_down_is_unavailable() -> None:
    with RedisProcess() as redis_process:
        settings = make_settings("redis", {"url": redis_process.url, "timeout": 0.5})
        async with running_server(settings) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = LeaderElectionStub(channel)
                locks = refs(service_name(), 5)
                for ref in locks:
                    await acquire(stub, ref, "alice")
                redis_process.stop()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.keep_alive_many(
                        pb.KeepAliveManyRequest(client_id="alice", locks=locks, ttl=20)
                    )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "redis" in caught.value.details()
                counts = server.runtime.current.telemetry.operation_counts()
                assert counts[("keep_alive_many", "error", "redis")] == 5


# -- the SDK: leaderships() ------------------------------------------------------------


class Events:
    """What a LeaseSet's callbacks saw, in order."""

    def __init__(self) -> None:
        self.elected: list[Lease] = []
        self.lost: list[Lease] = []
        self.callbacks = Callbacks(
            on_leader_elected=self.elected.append, on_leader_lost=self.lost.append
        )


def count_batches(server: LockServer) -> dict[str, int]:
    """Wrap the store so the test sees how many batched and single renewals it served."""
    store = server.runtime.current.store
    calls = {"keep_alive_many": 0, "locks": 0, "keep_alive": 0}
    many, one = store.keep_alive_many, store.keep_alive

    async def keep_alive_many(keys, *args):
        calls["keep_alive_many"] += 1
        calls["locks"] += len(keys)
        return await many(keys, *args)

    async def keep_alive(*args):
        calls["keep_alive"] += 1
        return await one(*args)

    store.keep_alive_many, store.keep_alive = keep_alive_many, keep_alive
    return calls


@FAST_STORES
async def test_many_leases_are_kept_alive_by_one_loop_of_batched_calls(
    server: LockServer, address: str
) -> None:
    calls = count_batches(server)
    domains = [f"shard-{n}" for n in range(300)]
    # Leases of 3 s, renewed every 1 s: a loaded machine may stall the loop for a
    # second or two without costing one.
    async with QuorumQuestClient(service_name(), "unused", 3.0, address) as client:
        async with client.leaderships(domains) as leases:
            assert isinstance(leases, LeaseSet)
            assert len(leases) == 300
            tokens = {lease.domain: lease.fencing_token for lease in leases}
            await asyncio.sleep(7.5)  # two and a half leases: only renewals keep them
            assert len(leases) == 300
            assert all(lease.is_valid for lease in leases)
            assert {lease.domain: lease.fencing_token for lease in leases} == tokens
            holder = await server.runtime.current.store.get_leader(
                LockKey(client.service, "shard-123")
            )
            assert holder is not None and holder.client_id == client.client_id
    assert calls["keep_alive"] == 0
    assert calls["locks"] >= 300 * 2  # every lease renewed, at least twice
    assert calls["keep_alive_many"] * 10 <= calls["locks"]  # in batches, not one by one


@FAST_STORES
async def test_one_lost_lease_is_reported_while_the_others_continue(
    server: LockServer, address: str
) -> None:
    events = Events()
    service = service_name()
    async with QuorumQuestClient(service, "unused", 3.0, address) as client:
        async with client.leaderships(
            [f"shard-{n}" for n in range(20)], callbacks=events.callbacks
        ) as leases:
            victim = leases.get("shard-7")
            assert victim is not None
            # The lock disappears behind the client's back (e.g. an operator deleted it).
            await server.runtime.current.store.release(
                LockKey(service, "shard-7"), client.client_id
            )
            with anyio_fail_after(30):  # its next renewal finds it gone
                reason = await victim.wait_ended()
            assert "no longer holds" in reason
            assert not victim.is_valid
            await asyncio.sleep(4.0)  # the others keep being renewed, past their first lease
            assert leases.get("shard-7") is None
            assert len(leases) == 19
            assert events.lost == [victim]
        assert len(events.elected) == 20
    assert len(events.lost) == 20  # the other 19 on release at exit


def anyio_fail_after(seconds: float):
    import anyio

    return anyio.fail_after(seconds)


@FAST_STORES
async def test_locks_held_by_others_are_skipped_until_try_acquire_gets_them(
    address: str,
) -> None:
    service = service_name()
    async with (
        QuorumQuestClient(service, "shard-0", 5, address) as other,
        QuorumQuestClient(service, "unused", 5, address) as client,
    ):
        assert await other.try_acquire_lock()
        async with client.leaderships([(service, f"shard-{n}") for n in range(3)]) as leases:
            assert leases.get("shard-0") is None
            assert {lease.domain for lease in leases} == {"shard-1", "shard-2"}
            assert await leases.try_acquire() == []
            await other.release_lock()
            [taken] = await leases.try_acquire()
            assert (taken.service, taken.domain) == (service, "shard-0")
            assert leases.get((service, "shard-0")) is taken


@FAST_STORES
async def test_every_lease_is_released_on_exit(address: str) -> None:
    service = service_name()
    async with QuorumQuestClient(service, "unused", 5, address) as client:
        async with client.leaderships([f"shard-{n}" for n in range(10)]) as leases:
            held = list(leases)
            assert await leases.release("shard-3")
            assert leases.get("shard-3") is None
        assert all(not lease.is_valid and lease.end_reason for lease in held)
        for n in range(10):
            probe = QuorumQuestClient(service, f"shard-{n}", 5, address)
            async with probe:
                assert await probe.get_leader() is None


@MEMORY_ONLY
async def test_a_failed_batch_is_retried_within_the_leases(
    server: LockServer, address: str
) -> None:
    store = server.runtime.current.store
    real = store.keep_alive_many
    failures = 0

    async def flaky_keep_alive_many(*args):
        nonlocal failures
        if failures == 0:
            failures += 1
            raise StoreUnavailable("memory", "injected failure")
        return await real(*args)

    store.keep_alive_many = flaky_keep_alive_many
    async with QuorumQuestClient(service_name(), "unused", 3.0, address) as client:
        async with client.leaderships([f"shard-{n}" for n in range(50)]) as leases:
            await asyncio.sleep(4.0)  # past the first lease: the failed batch was retried
            assert len(leases) == 50
    assert failures == 1


@pytest.mark.redis
async def test_leases_end_no_later_than_their_deadline_when_the_store_is_down() -> None:
    with RedisProcess() as redis_process:
        settings = make_settings("redis", {"url": redis_process.url, "timeout": 0.2})
        async with running_server(settings) as server:
            address = f"127.0.0.1:{server.port}"
            async with QuorumQuestClient(service_name(), "unused", 1.0, address) as client:
                async with client.leaderships([f"shard-{n}" for n in range(20)]) as leases:
                    held = list(leases)
                    redis_process.stop()
                    for lease in held:
                        assert "expired" in await lease.wait_ended()
                        # Judged on the clock, not on when the loop got round to it.
                        assert not lease.is_valid and lease.remaining == 0
                    assert len(leases) == 0


async def test_bad_lock_names_reach_the_caller(address: str) -> None:
    async with QuorumQuestClient("svc", "unused", 5, address) as client:
        with pytest.raises(InvalidArgument) as caught:
            async with client.leaderships(["ok", ""]):
                pytest.fail("must not enter")
    assert caught.value.field == "domain"
