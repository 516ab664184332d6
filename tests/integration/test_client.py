"""The Python SDK against a real server (memory and Redis stores)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from quorum_quest import Callbacks, InvalidArgument, LeadershipLost, QuorumQuestClient
from quorum_quest.server import running_server
from quorum_quest.stores import LockKey
from tests.backends.redis import RedisProcess
from tests.conftest import make_settings


def lock_name() -> str:
    return f"lock-{uuid.uuid4().hex[:8]}"


async def test_go_style_acquire_keep_alive_release(address: str) -> None:
    events: list[tuple[str, int]] = []
    callbacks = Callbacks(
        on_leader_elected=lambda lease: events.append(("elected", lease.fencing_token)),
        on_leader_lost=lambda lease: events.append(("lost", lease.fencing_token)),
    )
    domain = lock_name()
    # 3 s leases renewed every 1 s: a loaded machine's stalls cost no lease. Calls may
    # take longer than the default (a third of the lease): a first LWT on a loaded
    # machine's Cassandra can.
    async with QuorumQuestClient(
        "svc", domain, 3, address, callbacks=callbacks, rpc_timeout=30
    ) as client:
        assert await client.try_acquire_lock()
        assert client.is_leader
        token = client.lease.fencing_token
        await client.start_keep_alive()
        await asyncio.sleep(7.5)  # two and a half leases: only renewals keep it
        assert client.is_leader
        assert 0 < client.remaining_lease.total_seconds() <= 3
        assert await client.get_leader() == (client.client_id, token)
        assert await client.release_lock()
        assert not client.is_leader
        client.stop_keep_alive()
        assert await client.get_leader() is None
    assert events == [("elected", token), ("lost", token)]


async def test_follower_sees_leader_then_takes_over_after_release(address: str) -> None:
    domain = lock_name()
    async with (
        QuorumQuestClient("svc", domain, 5, address) as leader,
        QuorumQuestClient("svc", domain, 5, address) as follower,
    ):
        assert await leader.try_acquire_lock()
        assert not await follower.try_acquire_lock()
        first = leader.lease.fencing_token
        await leader.release_lock()
        assert await follower.try_acquire_lock()
        assert follower.lease.fencing_token > first


async def test_two_clients_never_both_lead(address: str) -> None:
    """Leadership intervals recorded on one monotonic clock never overlap."""
    domain = lock_name()
    intervals: list[tuple[float, float, int]] = []

    async def contender(n: int) -> None:
        client = QuorumQuestClient("svc", domain, 3, address, client_id=f"c{n}")
        async with client:
            for _ in range(4):
                async with client.leadership(timeout=20) as lease:
                    start = time.monotonic()
                    await asyncio.sleep(0.05)
                    intervals.append((start, time.monotonic(), lease.fencing_token))

    await asyncio.gather(*(contender(n) for n in range(3)))
    intervals.sort()
    assert len(intervals) == 12
    for (_, end, token), (next_start, _, next_token) in zip(intervals, intervals[1:], strict=False):
        assert end <= next_start
        assert next_token > token


async def test_unrenewed_lease_expires_and_another_takes_over_with_larger_token(
    address: str,
) -> None:
    domain = lock_name()
    async with (
        QuorumQuestClient("svc", domain, 1.5, address) as first,
        QuorumQuestClient("svc", domain, 1.5, address) as second,
    ):
        assert await first.try_acquire_lock()  # and no keep-alive
        token = first.lease.fencing_token
        started = time.monotonic()
        async with second.leadership(timeout=30) as lease:
            waited = time.monotonic() - started
            assert lease.fencing_token > token
        assert waited >= 1.2  # not before the first lease ran out (less the client's margin)
        assert not first.is_leader


async def test_leadership_times_out_when_someone_else_leads(address: str) -> None:
    domain = lock_name()
    async with (
        QuorumQuestClient("svc", domain, 10, address) as holder,
        QuorumQuestClient("svc", domain, 10, address) as waiter,
    ):
        assert await holder.try_acquire_lock()
        with pytest.raises(TimeoutError):
            async with waiter.leadership(timeout=0.5):
                pytest.fail("must not lead")


async def test_leadership_body_is_cancelled_when_the_service_refuses_renewal(
    server, address
) -> None:
    domain = lock_name()
    client = QuorumQuestClient("svc", domain, 3, address)
    body_cancelled = False
    with pytest.raises(LeadershipLost) as lost:
        async with client:
            async with client.leadership() as lease:
                # The lock disappears behind the client's back (e.g. an operator deleted it).
                await server.runtime.current.store.release(LockKey("svc", domain), lease.client_id)
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    body_cancelled = True
                    raise
    assert body_cancelled
    # At the refused renewal, not at the lease's end.
    assert "no longer holds" in str(lost.value)


@pytest.mark.redis
async def test_leadership_body_is_cancelled_when_the_store_is_unreachable() -> None:
    with RedisProcess() as redis_process:
        settings = make_settings("redis", {"url": redis_process.url, "timeout": 0.2})
        async with running_server(settings) as server:
            client = QuorumQuestClient("svc", lock_name(), 1.0, f"127.0.0.1:{server.port}")
            body_cancelled = False
            with pytest.raises(LeadershipLost):
                async with client, client.leadership() as lease:
                    redis_process.stop()
                    try:
                        await asyncio.sleep(10)
                    except asyncio.CancelledError:
                        body_cancelled = True
                        raise
            # Cancelled once the lease could no longer be vouched for (judged on the
            # clock, whenever the loop got round to it).
            assert body_cancelled and not lease.is_valid


async def test_one_failed_renewal_is_retried_within_the_lease(server, address) -> None:
    client = QuorumQuestClient("svc", lock_name(), 3, address)
    real = server.runtime.current.store.keep_alive
    failures = 0

    async def flaky_keep_alive(*args):
        nonlocal failures
        if failures == 0:
            failures += 1
            from quorum_quest.errors import StoreUnavailable

            raise StoreUnavailable("memory", "injected failure")
        return await real(*args)

    server.runtime.current.store.keep_alive = flaky_keep_alive
    async with client, client.leadership() as lease:
        await asyncio.sleep(4.0)  # past the first lease: the failed renewal was retried
        lease.ensure_valid()
    assert failures == 1


async def test_leadership_releases_on_exit(address: str) -> None:
    domain = lock_name()
    async with QuorumQuestClient("svc", domain, 10, address) as client:
        async with client.leadership():
            assert await client.get_leader() is not None
        assert await client.get_leader() is None


async def test_an_error_raised_in_the_leadership_body_comes_out_as_itself(address: str) -> None:
    class Refused(Exception):
        pass

    async with QuorumQuestClient("svc", lock_name(), 10, address) as client:
        with pytest.raises(Refused):  # not an ExceptionGroup holding it
            async with client.leadership():
                raise Refused("the body's own error")
        assert await client.get_leader() is None  # released all the same


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": 3, "keep_alive_interval": 3}, "keep_alive_interval"),
        ({"ttl": 3, "safety_margin": 2}, "safety_margin"),
        ({"ttl": 3, "rpc_timeout": 0}, "rpc_timeout"),
    ],
)
def test_inconsistent_timing_is_rejected_at_construction(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        QuorumQuestClient("svc", "dom", address="127.0.0.1:1", **kwargs)
    assert caught.value.field == field


async def test_service_errors_reach_the_caller(address: str) -> None:
    async with QuorumQuestClient("", "dom", 5, address) as client:
        with pytest.raises(InvalidArgument) as caught:
            await client.try_acquire_lock()
    assert caught.value.field == "service"


async def test_no_service_is_service_unavailable_with_the_status_code() -> None:
    import grpc

    from quorum_quest import ServiceUnavailable
    from tests.backends import free_port

    client = QuorumQuestClient("svc", "dom", 3, f"127.0.0.1:{free_port()}", rpc_timeout=0.5)
    async with client:
        with pytest.raises(ServiceUnavailable) as caught:
            await client.try_acquire_lock()
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert not client.is_leader


async def test_a_lease_whose_release_got_no_answer_is_never_resumed(server, address) -> None:
    """Each leadership acts on a new grant, even when the previous release failed."""
    from quorum_quest.errors import StoreUnavailable

    store = server.runtime.current.store
    real_release = store.release
    calls = 0

    async def release_failing_once(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable(store.backend, "injected failure")
        return await real_release(*args)

    store.release = release_failing_once
    client = QuorumQuestClient("svc", lock_name(), 5, address)
    async with client:
        async with client.leadership() as first:
            pass
        assert not client.is_leader  # the release failed: the client stops believing anyway
        async with client.leadership() as second:
            assert second.fencing_token > first.fencing_token
    assert calls == 3  # the failed release, the sure one, and the release on exit


async def test_leadership_waits_out_the_stores_grace_period() -> None:
    settings = make_settings("memory", {}, server={"stateLossGrace": 0.8})
    async with running_server(settings) as server:
        started = time.monotonic()
        client = QuorumQuestClient("svc", lock_name(), 5, f"127.0.0.1:{server.port}")
        async with client, client.leadership(timeout=10) as lease:
            waited = time.monotonic() - started
            assert lease.is_valid
        # Not a timing assertion: no grant can exist before the grace period ends.
        assert waited >= 0.8 - 0.05
