"""The Redis store on Redis Cluster: what only a cluster can show.

The contract suite runs on the cluster as the variant `redis-cluster`; these tests add
where keys live, how a shard's state loss stays its own, and the wake-ups and health
across shards. Nothing is judged by speed: waits are for a state, with generous
ceilings.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from redis.crc import key_slot

from quorum_quest.errors import ConfigError, StoreUnavailable
from quorum_quest.stores import LockKey, LockStore, store_class
from quorum_quest.stores.redis_cluster import RedisClusterStore, slot_tag
from tests.backends.redis_cluster import RedisCluster
from tests.conftest import make_settings

pytestmark = pytest.mark.redis

LONG_MS = 60_000
T = TypeVar("T")


def config_of(cluster: RedisCluster) -> dict[str, Any]:
    return {
        "cluster": True,
        "nodes": cluster.seeds[:2],
        "key_prefix": f"test-{uuid.uuid4().hex[:12]}",
        "timeout": 30.0,
    }


async def started(config: dict[str, Any], grace_ms: int = 0) -> RedisClusterStore:
    store = store_class("redis")(make_settings("redis", config).store_settings(), grace_ms=grace_ms)
    assert isinstance(store, RedisClusterStore)
    await store.start()
    return store


@pytest.fixture
async def cluster_store(redis_cluster: RedisCluster) -> AsyncIterator[RedisClusterStore]:
    store = await started(config_of(redis_cluster))
    try:
        yield store
    finally:
        await store.close()


def slot_of(store: LockStore, key: LockKey) -> int:
    assert isinstance(store, RedisClusterStore)
    return key_slot(store._lock_key(key).encode())


def keys_per_primary(store: LockStore, cluster: RedisCluster, count: int = 1) -> dict[str, list]:
    """`count` fresh lock keys owned by each primary, by its address."""
    owners = {node.address: [] for node in cluster.primaries()}
    while any(len(keys) < count for keys in owners.values()):
        key = LockKey("svc-" + uuid.uuid4().hex[:8], "dom")
        keys = owners[cluster.owner(slot_of(store, key)).address]
        if len(keys) < count:
            keys.append(key)
    return owners


async def answered(call: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """`call()` once the store answers again (after a node restart its connections fail
    once); a generous ceiling, never a measure of speed."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await call()
        except StoreUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


def test_the_store_with_cluster_true_is_the_cluster_store(redis_cluster: RedisCluster) -> None:
    settings = make_settings("redis", config_of(redis_cluster)).store_settings()
    assert type(store_class("redis")(settings)) is RedisClusterStore
    plain = make_settings("redis", {"url": "redis://127.0.0.1:1/0"}).store_settings()
    assert type(store_class("redis")(plain)) is store_class("redis")


def test_every_slot_has_a_tag_that_hashes_to_it() -> None:
    assert all(key_slot(f"x:{{{slot_tag(slot)}}}:state".encode()) == slot for slot in range(16384))


def test_nodes_are_host_port_in_a_list_or_one_comma_separated_string() -> None:
    settings = make_settings("redis", {"cluster": True, "nodes": "h1:7000, h2:7001"})
    assert settings.store_settings().nodes == ["h1:7000", "h2:7001"]
    with pytest.raises(ConfigError, match="store.nodes: '127.0.0.1' is not host:port"):
        make_settings("redis", {"cluster": True, "nodes": ["127.0.0.1"]}).store_settings()


async def test_keys_of_one_lock_and_its_state_marker_share_one_slot(
    cluster_store: RedisClusterStore,
) -> None:
    for key in [LockKey("a:b", "c}{d"), LockKey("svc", "dom"), LockKey("ünï", "x" * 200)]:
        lock = cluster_store._lock_key(key)
        slots = {
            key_slot(name.encode())
            for name in [lock, f"{lock}:waiting", f"{lock}:token", cluster_store._marker_of(lock)]
        }
        assert len(slots) == 1, (key, slots)


async def test_locks_spread_across_every_primary_and_each_is_granted_once(
    cluster_store: RedisClusterStore, redis_cluster: RedisCluster
) -> None:
    owners = keys_per_primary(cluster_store, redis_cluster, count=3)
    assert len(owners) == 3
    keys = [key for keys in owners.values() for key in keys]
    granted = await asyncio.gather(*(cluster_store.acquire(key, "alice", LONG_MS) for key in keys))
    assert all(grant.acquired for grant in granted)
    refused = await asyncio.gather(*(cluster_store.acquire(key, "bob", LONG_MS) for key in keys))
    assert not any(answer.acquired for answer in refused)
    renewals = await cluster_store.keep_alive_many([*keys, *keys[:2]], "alice", LONG_MS)
    tokens = [grant.token for grant in granted]
    assert [renewal.token for renewal in renewals] == [*tokens, *tokens[:2]]
    holders = await cluster_store.get_leaders(keys)
    assert [holder.client_id for holder in holders if holder] == ["alice"] * len(keys)
    leaders = await cluster_store.leaders(keys[0].service)
    assert set(leaders) == {keys[0]}


async def test_a_release_on_any_shard_wakes_the_waiters_of_another_instance(
    cluster_store: RedisClusterStore, redis_cluster: RedisCluster
) -> None:
    woken: asyncio.Queue[LockKey] = asyncio.Queue()
    config = {**cluster_store.settings.model_dump(), "nodes": redis_cluster.seeds[-1:]}
    waiter = store_class("redis")(make_settings("redis", config).store_settings())
    waiter.notify_releases(woken.put_nowait)
    await waiter.start()
    try:
        keys = [keys[0] for keys in keys_per_primary(cluster_store, redis_cluster).values()]
        for key in keys:
            assert (await cluster_store.acquire(key, "alice", LONG_MS)).acquired
            await waiter.expect_release(key, LONG_MS)
        # The subscription may still be on its way: release once it surely listens.
        await asyncio.sleep(0.5)
        for key in keys:
            assert await cluster_store.release(key, "alice")
        heard = {await asyncio.wait_for(woken.get(), 30) for _ in keys}
        assert heard == set(keys)
    finally:
        await waiter.close()


async def test_ping_fails_when_the_cluster_reports_fail(
    fresh_redis_cluster: RedisCluster,
) -> None:
    store = await started(config_of(fresh_redis_cluster))
    try:
        await store.ping()
        # One shard gone, primary and replica: its slots are uncovered.
        shard = keys_per_primary(store, fresh_redis_cluster)
        victim = fresh_redis_cluster.node(next(iter(shard)))
        replica = fresh_redis_cluster.replica_of(victim)
        replica.kill()
        victim.kill()

        async def fails() -> None:
            while True:
                try:
                    await store.ping()
                except StoreUnavailable as exc:
                    if "cluster_state" in str(exc):
                        return
                await asyncio.sleep(0.2)

        await asyncio.wait_for(fails(), 60)
    finally:
        await store.close()


async def test_a_primary_restarted_empty_starts_the_grace_for_its_own_locks_only(
    fresh_redis_cluster: RedisCluster,
) -> None:
    cluster = fresh_redis_cluster
    store = await started(config_of(cluster), grace_ms=0)
    try:
        owners = keys_per_primary(store, cluster, count=2)
        before = {}
        for keys in owners.values():
            for key in keys:
                granted = await store.acquire(key, "alice", LONG_MS)
                assert granted.acquired
                before[key] = granted.token
        victim_address, (lost_key, _) = next(iter(owners.items()))
        victim = cluster.node(victim_address)
        others = [keys for address, keys in owners.items() if address != victim_address]

        # The shard's replica down first, so that no failover can come: the primary
        # itself comes back empty, and keeps its slots.
        replica = cluster.replica_of(victim)
        replica.kill()
        victim.restart()
        cluster.wait_until_ok()
        store.grace_ms = LONG_MS

        left = await answered(store.check_state)
        assert 0 < left <= LONG_MS
        # The restarted shard refuses its locks, held before or new...
        refused = await answered(lambda: store.acquire(lost_key, "bob", LONG_MS))
        assert refused.grace and not refused.acquired
        fresh_on_victim = keys_per_primary(store, cluster)[victim_address][0]
        assert (await store.acquire(fresh_on_victim, "bob", LONG_MS)).grace
        # ...while the other shards keep renewing and granting theirs.
        for keys in others:
            renewal = await store.keep_alive(keys[0], "alice", LONG_MS)
            assert renewal.renewed and renewal.token == before[keys[0]]
            assert await store.release(keys[1], "alice")
            again = await store.acquire(keys[1], "carol", LONG_MS)
            assert again.acquired and again.token > before[keys[1]]

        # Once the grace period ends, the lost lock is granted again with a larger token
        # (the floor, `last_token`, went with the data: the clock floors it).
        store.grace_ms = 0
        marker = store._marker_of(store._lock_key(lost_key))
        with victim.client() as client:
            client.hset(marker, "grace_until", "0")
        granted = await store.acquire(lost_key, "bob", LONG_MS)
        assert granted.acquired and granted.token > before[lost_key]
        replica.start()
        cluster.wait_until_ok()
    finally:
        await store.close()


async def test_a_promoted_replica_starts_the_grace_for_its_shard_only(
    fresh_redis_cluster: RedisCluster,
) -> None:
    cluster = fresh_redis_cluster
    store = await started(config_of(cluster), grace_ms=0)
    try:
        owners = keys_per_primary(store, cluster)
        before = {}
        for (key,) in owners.values():
            granted = await store.acquire(key, "alice", LONG_MS)
            assert granted.acquired
            before[key] = granted.token
        victim_address, (lost_key,) = next(iter(owners.items()))
        others = [keys[0] for address, keys in owners.items() if address != victim_address]
        store.grace_ms = LONG_MS
        slot = slot_of(store, lost_key)
        cluster.kill_primary_of(slot)
        promoted = cluster.wait_for_failover(slot)
        assert promoted.address != victim_address

        refused = await answered(lambda: store.acquire(lost_key, "bob", LONG_MS))
        assert refused.grace and not refused.acquired
        assert not (await store.keep_alive(lost_key, "alice", LONG_MS)).renewed
        assert 0 < await answered(store.check_state) <= LONG_MS
        for key in others:
            renewal = await store.keep_alive(key, "alice", LONG_MS)
            assert renewal.renewed and renewal.token == before[key]
            assert await store.release(key, "alice")
            again = await store.acquire(key, "carol", LONG_MS)
            assert again.acquired and again.token > before[key]

        store.grace_ms = 0
        with promoted.client() as client:
            client.hset(store._marker_of(store._lock_key(lost_key)), "grace_until", "0")
        # Replication is asynchronous: the lease survived, with its token, only if its
        # grant reached the replica before the kill. Either way the next token is larger.
        renewal = await store.keep_alive(lost_key, "alice", LONG_MS)
        if renewal.renewed:
            assert renewal.token == before[lost_key]
            assert await store.release(lost_key, "alice")
        granted = await store.acquire(lost_key, "bob", LONG_MS)
        assert granted.acquired and granted.token > before[lost_key]
        cluster.restart_killed()
    finally:
        await store.close()


async def test_grants_and_releases_on_every_shard_are_followed(
    cluster_store: RedisClusterStore, redis_cluster: RedisCluster
) -> None:
    changes: asyncio.Queue[Any] = asyncio.Queue()
    synced = asyncio.Event()
    follower = asyncio.create_task(cluster_store.follow(changes.put_nowait, synced.set))
    try:
        await asyncio.wait_for(synced.wait(), 30)
        keys = [keys[0] for keys in keys_per_primary(cluster_store, redis_cluster).values()]
        tokens = {}
        for key in keys:
            tokens[key] = (await cluster_store.acquire(key, "alice", LONG_MS)).token
            assert await cluster_store.release(key, "alice")
        expected = {(key, "alice", tokens[key]) for key in keys}
        expected |= {(key, "", tokens[key]) for key in keys}
        seen = set()
        while seen != expected:
            change = await asyncio.wait_for(changes.get(), 30)
            seen.add((change.key, change.holder, change.token))
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


async def test_more_concurrent_calls_than_connections_wait_for_one_instead_of_failing(
    cluster_store: RedisClusterStore,
) -> None:
    # Far more calls in flight than `max_connections` (64) lets one primary have.
    many = 20 * cluster_store.settings.max_connections
    service = uuid.uuid4().hex
    results = await answered(
        lambda: asyncio.gather(
            *(
                cluster_store.acquire(LockKey(service, f"lock-{n}"), "me", 30_000)
                for n in range(many)
            )
        )
    )
    assert all(result.acquired for result in results)
