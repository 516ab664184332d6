"""`leadership()` and `wait_for_leadership()` at their edges (issue #14): callbacks that
outlast a lease, a lease lost while the body awaits a gRPC call, service restarts, and
a timeout or cancellation that strikes after the service granted the lock.

Every wait here is for an event (a callback entered, a grant made, a lease renewed);
durations only say how long something must last at least, with wide margins.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from quorum_quest import Callbacks, LeadershipLost, Lease, QuorumQuestClient, ServiceUnavailable
from quorum_quest.server import LockServer
from quorum_quest.stores import LockKey
from tests.backends import free_port
from tests.conftest import make_settings

MEMORY_ONLY = pytest.mark.parametrize("store_variant", ["memory"])
# A gRPC method that never answers (see `silent_endpoint`).
SILENT_METHOD = "/qq.test.Silent/Wait"


def lock_name() -> str:
    return f"lock-{uuid.uuid4().hex[:8]}"


async def forever() -> None:
    await asyncio.Event().wait()


async def outcome(work: Awaitable[Any]) -> BaseException | str | None:
    """How `work` ended, run as a task of its own: its exception, "cancelled" when the
    task ended cancelled, or None."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait([task])
    finally:
        task.cancel()
    if task.cancelled():
        return "cancelled"
    return task.exception()


@asynccontextmanager
async def silent_endpoint(called: asyncio.Event | None = None) -> AsyncIterator[str]:
    """A gRPC server of the test's own whose one method (`SILENT_METHOD`) never answers
    (it sets `called` on a call); its address."""

    async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if called is not None:
            called.set()
        await forever()
        return b""

    handler = grpc.method_handlers_generic_handler(
        "qq.test.Silent", {"Wait": grpc.unary_unary_rpc_method_handler(wait)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


# -- #14.3: the body never starts on an ended lease ---------------------------------------


@MEMORY_ONLY
async def test_leadership_keeps_the_lease_alive_while_on_leader_elected_runs(
    address: str,
) -> None:
    """A callback longer than the lease: only renewals during it keep the lock ours."""
    ttl = 3.0
    domain = lock_name()
    rival = QuorumQuestClient("svc", domain, ttl, address)
    rival_led_during_callback: bool | None = None

    async def elected(lease: Lease) -> None:
        nonlocal rival_led_during_callback
        await asyncio.sleep(1.5 * ttl)  # the first grant alone has run out by now
        rival_led_during_callback = await rival.try_acquire_lock()

    client = QuorumQuestClient(
        "svc", domain, ttl, address, callbacks=Callbacks(on_leader_elected=elected)
    )
    async with client, rival, client.leadership(timeout=30) as lease:
        valid_on_entry = lease.is_valid
    assert rival_led_during_callback is False
    assert valid_on_entry


@MEMORY_ONLY
async def test_leadership_never_enters_its_body_on_a_lease_lost_during_on_leader_elected(
    server: LockServer, address: str
) -> None:
    ttl = 1.5
    domain = lock_name()

    async def elected(lease: Lease) -> None:
        # The lock disappears behind the client's back (an operator deleted it) ...
        await server.runtime.current.store.release(LockKey("svc", domain), lease.client_id)
        await asyncio.sleep(2 * ttl)  # ... while the callback takes its time

    client = QuorumQuestClient(
        "svc", domain, ttl, address, callbacks=Callbacks(on_leader_elected=elected)
    )
    entered = False
    with pytest.raises(LeadershipLost):
        async with client, client.leadership(timeout=30):
            entered = True
    assert not entered


# -- #14.4: losing the lease mid-RPC is LeadershipLost, an outer cancel stays one ---------


def _silent_call(channel: grpc.aio.Channel) -> Callable[[], Awaitable[Any]]:
    method = channel.unary_unary(SILENT_METHOD)
    return lambda: method(b"")


@MEMORY_ONLY
@pytest.mark.parametrize("call", ["user-channel", "client-get-leader"])
async def test_losing_the_lease_while_the_body_awaits_a_grpc_call_raises_leadership_lost(
    server: LockServer, address: str, call: str
) -> None:
    """The body awaits a gRPC call that never answers when the lease is lost: the loss
    must surface as LeadershipLost, and the task must go on (here: lead again)."""
    domain = lock_name()
    store = server.runtime.current.store
    real_get_leader = store.get_leader
    lost = asyncio.Event()

    async def silent_get_leader(key: LockKey) -> Any:
        if not lost.is_set():
            await forever()
        return await real_get_leader(key)

    store.get_leader = silent_get_leader
    client = QuorumQuestClient("svc", domain, 1.5, address)

    async def lead_twice(slow_call: Callable[[], Awaitable[Any]]) -> None:
        async with client:
            try:
                async with client.leadership(timeout=30) as first:
                    await store.release(LockKey("svc", domain), first.client_id)
                    while True:  # always inside the call (get_leader gives up after a while)
                        with contextlib.suppress(ServiceUnavailable):
                            await slow_call()
            except LeadershipLost:
                lost.set()
            # A "retry on LeadershipLost" loop competes on.
            async with client.leadership(timeout=30) as second:
                assert second.fencing_token > first.fencing_token

    async with silent_endpoint() as silent, grpc.aio.insecure_channel(silent) as channel:
        slow_call = _silent_call(channel) if call == "user-channel" else client.get_leader
        result = await outcome(lead_twice(slow_call))
    assert result is None, f"the caller's task ended with {result!r}, not LeadershipLost"


@MEMORY_ONLY
async def test_an_outer_cancellation_of_a_body_awaiting_a_grpc_call_stays_a_cancellation(
    address: str,
) -> None:
    called = asyncio.Event()
    client = QuorumQuestClient("svc", lock_name(), 5, address)

    async def lead(channel: grpc.aio.Channel) -> None:
        async with client.leadership(timeout=30):
            await _silent_call(channel)()

    async with (
        client,
        silent_endpoint(called) as silent,
        grpc.aio.insecure_channel(silent) as channel,
    ):
        task = asyncio.ensure_future(lead(channel))
        await called.wait()  # the body awaits the call
        task.cancel()
        await asyncio.wait([task])
        assert task.cancelled()
        assert await client.get_leader() is None  # released on the way out


# -- #14.10: a service restart far shorter than the lease never costs it -------------------

RESTART_TTL_S = 6.0  # renewed every 2 s (the SDK's default cadence), valid 5.4 s after one
OUTAGE_S = 1.5  # from just before a renewal falls due: about 2 s of slack remain after it


async def renewed_since(lease: Lease, since: float, ttl: float, margin: float) -> None:
    """Until a renewal sent after `since` (monotonic) came back: the lease then reaches
    beyond what any earlier renewal could give it. Raises if the lease ends first."""
    while time.monotonic() + lease.remaining <= since + ttl - margin:
        lease.ensure_valid()
        await asyncio.sleep(0.05)


async def renewal_due(lease: Lease, client: QuorumQuestClient) -> None:
    """Until the next renewal of a lease just renewed is about to be sent."""
    due_at = client.ttl - client.safety_margin - client.keep_alive_interval
    while lease.remaining > due_at + 0.1:
        await asyncio.sleep(0.02)


@pytest.mark.redis
@pytest.mark.timeout(90)
async def test_a_lease_survives_two_service_restarts_far_shorter_than_its_ttl(
    redis_store_config: dict[str, Any],
) -> None:
    """Rolling restart: the service goes down for 1.5 s, twice, and comes back on the same
    port, the leases kept in Redis. The leader must keep its lease (and its body)."""
    port = free_port()
    settings = make_settings("redis", redis_store_config, serverAddress=f"127.0.0.1:{port}")
    server = LockServer(settings)
    await server.start()
    client = QuorumQuestClient("svc", lock_name(), RESTART_TTL_S, f"127.0.0.1:{port}")
    try:
        async with client, client.leadership(timeout=30) as lease:
            token = lease.fencing_token
            for _ in range(2):
                await renewed_since(lease, time.monotonic(), client.ttl, client.safety_margin)
                await renewal_due(lease, client)  # the renewal meets the service down
                await server.stop()
                await asyncio.sleep(OUTAGE_S)
                server = LockServer(settings)
                await server.start()
                # Renewals must get through to the new process before the lease runs out.
                await renewed_since(lease, time.monotonic(), client.ttl, client.safety_margin)
            assert lease.is_valid
            assert lease.fencing_token == token
    finally:
        await server.stop()


# -- #14.17: a timeout or cancellation never leaves a granted lease behind ----------------


@MEMORY_ONLY
async def test_wait_for_leadership_timing_out_during_on_leader_elected_releases_the_lease(
    address: str,
) -> None:
    domain = lock_name()
    entered = asyncio.Event()

    async def elected(lease: Lease) -> None:
        entered.set()
        await forever()

    client = QuorumQuestClient(
        "svc", domain, 30, address, callbacks=Callbacks(on_leader_elected=elected)
    )
    async with client, QuorumQuestClient("svc", domain, 30, address) as rival:
        with pytest.raises(TimeoutError):
            # Generous: the grant is one local call; the callback then never returns.
            await client.wait_for_leadership(timeout=3)
        assert entered.is_set()
        assert not client.is_leader
        assert await rival.try_acquire_lock()  # not held back for the 30 s lease


@MEMORY_ONLY
async def test_wait_for_leadership_timing_out_during_a_granted_acquire_releases_the_grant(
    server: LockServer, address: str
) -> None:
    """The service grants the lock, but its answer is held back until after the
    caller's timeout: the lease it granted must not stay behind for a whole ttl."""
    domain = lock_name()
    store = server.runtime.current.store
    real_acquire = store.acquire
    granted = asyncio.Event()

    async def grant_then_hang(key: LockKey, client_id: str, ttl_ms: int) -> Any:
        result = await real_acquire(key, client_id, ttl_ms)
        if client_id == "slow" and not granted.is_set():
            granted.set()
            await forever()  # the answer never leaves; the caller gives up
        return result

    store.acquire = grant_then_hang
    client = QuorumQuestClient("svc", domain, 30, address, client_id="slow")
    async with client, QuorumQuestClient("svc", domain, 30, address) as rival:
        await client.get_leader()  # connected: the acquire below is one local call
        with pytest.raises(TimeoutError):
            await client.wait_for_leadership(timeout=3)
        assert granted.is_set()
        assert not client.is_leader
        assert await rival.try_acquire_lock()  # not held back for the 30 s lease


@MEMORY_ONLY
async def test_leadership_cancelled_during_a_granted_acquire_releases_the_grant(
    server: LockServer, address: str
) -> None:
    """The same, with the caller cancelled (from outside) the moment the lock is granted."""
    domain = lock_name()
    store = server.runtime.current.store
    real_acquire = store.acquire
    granted = asyncio.Event()

    async def grant_then_hang(key: LockKey, client_id: str, ttl_ms: int) -> Any:
        result = await real_acquire(key, client_id, ttl_ms)
        if client_id == "slow":
            granted.set()
            await forever()
        return result

    store.acquire = grant_then_hang
    client = QuorumQuestClient("svc", domain, 30, address, client_id="slow")

    async def lead() -> None:
        async with client.leadership():
            pytest.fail("the answer never came: the body must not run")

    async with client, QuorumQuestClient("svc", domain, 30, address) as rival:
        task = asyncio.ensure_future(lead())
        await granted.wait()
        task.cancel()
        await asyncio.wait([task])
        assert task.cancelled()
        assert await rival.try_acquire_lock()
