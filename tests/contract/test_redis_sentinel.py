"""The Redis store behind Sentinel: it follows a failover, and treats it as a state loss."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from quorum_quest.errors import StoreUnavailable
from quorum_quest.stores import LockKey, store_class
from quorum_quest.stores.redis import RedisSettings, RedisStore
from tests.backends.sentinel import SentinelTopology

pytestmark = pytest.mark.redis

GRACE_MS = 5_000
# Leases no longer than the grace period, as `server.maxTtl` ensures in the service.
LEASE_MS = 4_000


def sentinel_store(topology: SentinelTopology, grace_ms: int = GRACE_MS) -> RedisStore:
    settings = RedisSettings.model_validate(
        {
            "sentinels": ",".join(topology.sentinel_addresses),
            "master_name": topology.master_name,
            "key_prefix": f"t-{uuid.uuid4().hex[:10]}",
            "timeout": 0.5,
        }
    )
    return store_class("redis")(settings, grace_ms=grace_ms)


async def until_answers(store: RedisStore, timeout: float = 30) -> int:
    """Ask `check_state` until the store reaches a primary again; the grace period left."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await store.check_state()
            except StoreUnavailable:
                await asyncio.sleep(0.1)


async def test_a_failover_is_followed_and_starts_a_grace_period(
    sentinel_topology: SentinelTopology,
) -> None:
    store = sentinel_store(sentinel_topology)
    key = LockKey("svc", "dom")
    try:
        await store.start()
        await asyncio.sleep(GRACE_MS / 1000)  # the new prefix's own grace period
        first = await store.acquire(key, "alice", LEASE_MS)
        assert first.acquired
        old_primary = sentinel_topology.kill_primary()
        new_primary = await asyncio.to_thread(sentinel_topology.wait_for_failover, 30)
        assert new_primary != old_primary
        # The replica may have missed the last writes: nothing is trusted for a while.
        assert 0 < await until_answers(store) <= GRACE_MS
        assert not (await store.keep_alive(key, "alice", LEASE_MS)).renewed
        refused = await store.acquire(key, "bob", LEASE_MS)
        assert refused.grace
        await asyncio.sleep(refused.ttl_ms / 1000 + 0.1)
        second = await store.acquire(key, "bob", LEASE_MS)
        assert second.acquired and second.token > first.token
    finally:
        await store.close()


async def test_an_evicting_primary_is_refused_behind_sentinel(
    sentinel_topology: SentinelTopology,
) -> None:
    store = sentinel_store(sentinel_topology)
    primary = aioredis.Redis.from_url(f"redis://{sentinel_topology.primary_address()}/0")
    try:
        await store.start()
        await primary.config_set("maxmemory-policy", "volatile-ttl")
        with pytest.raises(StoreUnavailable, match="maxmemory-policy is volatile-ttl"):
            await store.ping()
        await primary.config_set("maxmemory-policy", "noeviction")
        await store.ping()
    finally:
        await primary.aclose()
        await store.close()


def test_sentinel_addresses_are_checked() -> None:
    with pytest.raises(ValueError, match="host:port"):
        RedisSettings.model_validate({"sentinels": ["127.0.0.1"]})
    settings = RedisSettings.model_validate({"sentinels": "a:26379, b:26380"})
    assert settings.sentinels == ["a:26379", "b:26380"]
