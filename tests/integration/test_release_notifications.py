"""A waiting acquire on one service instance wakes when the lock is released through
another: the Redis store publishes releases of awaited locks to every instance."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.server import LockServer, running_server
from tests.conftest import make_settings

pytestmark = pytest.mark.redis

LEASE_S = 10  # the holder's lease: far longer than the waiter may wait
WAIT_MS = 4_000


@pytest.fixture
async def two_instances(redis_store_config: dict[str, Any]) -> AsyncIterator[list[LockServer]]:
    settings = make_settings("redis", redis_store_config)
    async with running_server(settings) as first, running_server(settings) as second:
        yield [first, second]


async def subscribers(url: str, channel: str, count: int) -> None:
    """Until `count` instances listen on `channel`."""
    admin = aioredis.Redis.from_url(url)
    try:
        for _ in range(100):
            if dict(await admin.pubsub_numsub(channel))[channel.encode()] >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"fewer than {count} subscribers on {channel}")
    finally:
        await admin.aclose()


def stub_of(server: LockServer) -> tuple[grpc.aio.Channel, LeaderElectionStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return channel, LeaderElectionStub(channel)


async def test_a_release_through_one_instance_wakes_a_waiter_on_another(
    two_instances: list[LockServer], redis_store_config: dict[str, Any]
) -> None:
    first, second = two_instances
    prefix = redis_store_config["key_prefix"]
    await subscribers(redis_store_config["url"], f"{prefix}:released", 2)
    lock = {"service": "svc", "domain": f"handover-{uuid.uuid4().hex[:8]}"}
    holder_channel, holder = stub_of(first)
    waiter_channel, waiter = stub_of(second)
    try:
        held = await holder.try_acquire_lock(
            pb.TryAcquireLockRequest(client_id="holder", ttl=LEASE_S, **lock)
        )
        assert held.is_leader
        waiting = asyncio.ensure_future(
            waiter.try_acquire_lock(
                pb.TryAcquireLockRequest(client_id="waiter", ttl=LEASE_S, wait_ms=WAIT_MS, **lock),
                timeout=WAIT_MS / 1000 + 2,
            )
        )
        await asyncio.sleep(0.3)  # the waiter is waiting on the second instance
        assert not waiting.done()
        released_at = time.monotonic()
        released = await holder.release_lock(
            pb.ReleaseLockRequest(client_id="holder", fencing_token=held.fencing_token, **lock)
        )
        assert released.released
        answer = await waiting
        # Without the notification the waiter would only have tried again when its
        # wait ran out (4 s), still inside the holder's 10 s lease, and been refused.
        assert answer.is_leader and answer.fencing_token > held.fencing_token
        assert time.monotonic() - released_at < WAIT_MS / 1000 / 2
    finally:
        await holder_channel.close()
        await waiter_channel.close()


async def test_a_release_nobody_waits_for_is_not_published(
    redis_store_config: dict[str, Any],
) -> None:
    settings = make_settings("redis", redis_store_config)
    channel = f"{redis_store_config['key_prefix']}:released"
    listener = aioredis.Redis.from_url(redis_store_config["url"])
    async with running_server(settings) as server, listener.pubsub() as pubsub:
        await pubsub.subscribe(channel)
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        grpc_channel, stub = stub_of(server)
        try:
            lock = {"service": "svc", "domain": f"quiet-{uuid.uuid4().hex[:8]}"}
            held = await stub.try_acquire_lock(
                pb.TryAcquireLockRequest(client_id="holder", ttl=LEASE_S, **lock)
            )
            await stub.release_lock(
                pb.ReleaseLockRequest(client_id="holder", fencing_token=held.fencing_token, **lock)
            )
            assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5) is None
        finally:
            await grpc_channel.close()
    await listener.aclose()
