"""What the Redis store promises beyond the shared contract."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from quorum_quest.errors import StoreUnavailable
from quorum_quest.stores import LockKey, store_class
from quorum_quest.stores.redis import SUBSCRIBER_POLL_S, RedisSettings, RedisStore
from tests.backends import free_port
from tests.backends.redis import RedisProcess

pytestmark = pytest.mark.redis


def make_store(grace_ms: int = 0, **settings: object) -> RedisStore:
    return store_class("redis")(RedisSettings.model_validate(settings), grace_ms=grace_ms)


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def keys_of(url: str, pattern: str, db: int = 0) -> list[bytes]:
    client = aioredis.Redis.from_url(f"{url.rsplit('/', 1)[0]}/{db}")
    try:
        return sorted([key async for key in client.scan_iter(match=pattern)])
    finally:
        await client.aclose()


async def test_both_keys_of_a_lock_share_one_hash_slot(redis_url: str, prefix: str) -> None:
    store = make_store(url=redis_url, key_prefix=prefix)
    store.notify_releases(lambda key: None)  # so that a wait sets the waiting flag
    await store.start()
    try:
        key = LockKey("orders{eu}", "shard:7")
        await store.acquire(key, "alice", 10_000)
        await store.expect_release(key, 10_000)
        keys = await keys_of(redis_url, f"{prefix}:{{*")
    finally:
        await store.close()
    assert len(keys) == 2, keys  # the lease and its waiting flag
    assert len({key_slot(key) for key in keys}) == 1


async def test_keys_carry_the_configured_prefix(redis_url: str, prefix: str) -> None:
    store = make_store(url=redis_url, key_prefix=prefix)
    await store.start()
    try:
        await store.acquire(LockKey("svc", "dom"), "alice", 10_000)
    finally:
        await store.close()
    assert await keys_of(redis_url, f"{prefix}:*") == [
        f"{prefix}:state".encode(),
        f"{prefix}:{{svc:dom}}".encode(),
    ]


async def test_db_setting_selects_the_database(redis_url: str, prefix: str) -> None:
    host_port = redis_url.removeprefix("redis://").split("/")[0]
    host, port = host_port.rsplit(":", 1)
    store = make_store(host=host, port=int(port), db=3, key_prefix=prefix)
    await store.start()
    try:
        await store.acquire(LockKey("svc", "dom"), "alice", 10_000)
    finally:
        await store.close()
    assert await keys_of(redis_url, f"{prefix}:*", db=0) == []
    assert len(await keys_of(redis_url, f"{prefix}:*", db=3)) == 2  # state marker, lease


async def test_password_is_used() -> None:
    with RedisProcess("--requirepass", "s3cret") as server:
        refused = make_store(host="127.0.0.1", port=server.port)
        with pytest.raises(StoreUnavailable, match="redis"):
            await refused.start()
        await refused.close()
        store = make_store(host="127.0.0.1", port=server.port, password="s3cret")
        await store.start()
        assert (await store.acquire(LockKey("svc", "dom"), "alice", 10_000)).acquired
        await store.close()


async def test_unreachable_redis_is_store_unavailable_naming_redis() -> None:
    store = make_store(host="127.0.0.1", port=free_port(), timeout=0.5)
    with pytest.raises(StoreUnavailable) as caught:
        await store.acquire(LockKey("svc", "dom"), "alice", 10_000)
    assert caught.value.backend == "redis"
    await store.close()


async def test_tokens_keep_rising_after_the_data_is_lost() -> None:
    with RedisProcess() as server:
        store = make_store(url=server.url)
        await store.start()
        key = LockKey("svc", "dom")
        before = (await store.acquire(key, "alice", 10_000)).token
        admin = aioredis.Redis.from_url(server.url)
        await admin.flushall()  # what a restart without persistence leaves behind
        await admin.aclose()
        after = (await store.acquire(key, "bob", 10_000)).token
        await store.close()
    assert after > before


# -- the state of idle locks -----------------------------------------------------------


async def test_an_idle_lock_leaves_no_key_behind(redis_url: str, prefix: str) -> None:
    """Neither a released nor an expired lease leaves anything of its lock in Redis, so
    a workload of ever new lock names does not fill it."""
    store = make_store(url=redis_url, key_prefix=prefix)
    await store.start()
    try:
        released, expired = LockKey("svc", "released"), LockKey("svc", "expired")
        granted = await store.acquire(released, "alice", 60_000)
        assert await store.release(released, "alice", granted.token)
        assert await keys_of(redis_url, f"{prefix}:{{svc:released}}*") == []
        assert (await store.acquire(expired, "alice", 100)).acquired
        async with asyncio.timeout(30):  # Redis deletes the lease 100 ms on
            while await keys_of(redis_url, f"{prefix}:{{svc:expired}}*"):
                await asyncio.sleep(0.05)
    finally:
        await store.close()


def clock_us_ahead(hours: int) -> int:
    """A token that the clock will read only `hours` from now: what tokens granted before
    Redis's clock was set back by that much look like."""
    return time.time_ns() // 1000 + hours * 3_600_000_000


async def test_tokens_rise_even_when_the_clock_reads_before_the_last_token(
    redis_url: str, prefix: str
) -> None:
    """An idle lock keeps no counter of its own, so a token cannot come from one: it is
    above the last token granted (kept in the state marker), whatever the clock reads."""
    store = make_store(url=redis_url, key_prefix=prefix)
    admin = aioredis.Redis.from_url(redis_url)
    await store.start()
    try:
        last = clock_us_ahead(hours=1)
        await admin.hset(f"{prefix}:state", "last_token", str(last))
        tokens = []
        for client in ("alice", "bob", "carol"):
            granted = await store.acquire(KEY, client, 60_000)
            assert await store.release(KEY, client, granted.token)
            assert await keys_of(redis_url, f"{prefix}:{{svc:dom}}*") == []
            tokens.append(granted.token)
        assert last < tokens[0] < tokens[1] < tokens[2]
    finally:
        await admin.aclose()
        await store.close()


async def test_a_counter_left_by_an_earlier_version_floors_the_next_token_and_goes(
    redis_url: str, prefix: str
) -> None:
    """Earlier versions kept a counter per lock, with no expiry; the next grant of its lock
    takes it into account and deletes it."""
    store = make_store(url=redis_url, key_prefix=prefix)
    admin = aioredis.Redis.from_url(redis_url)
    await store.start()
    try:
        counter = f"{prefix}:{{svc:dom}}:token"
        await admin.set(counter, str(legacy := clock_us_ahead(hours=1)))
        granted = await store.acquire(KEY, "alice", 60_000)
        assert granted.token > legacy
        assert not await admin.exists(counter)
        assert (await store.acquire(LockKey("svc", "other"), "alice", 60_000)).token > legacy
    finally:
        await admin.aclose()
        await store.close()


def test_key_prefix_with_braces_is_rejected() -> None:
    with pytest.raises(ValueError, match="key_prefix"):
        RedisSettings(key_prefix="a{b}")


async def test_more_concurrent_calls_than_connections_wait_for_a_connection(
    redis_url: str, prefix: str
) -> None:
    store = make_store(url=redis_url, key_prefix=prefix, max_connections=4)
    await store.start()
    try:
        results = await asyncio.gather(
            *(store.acquire(LockKey("svc", f"d{n}"), "alice", 10_000) for n in range(100))
        )
    finally:
        await store.close()
    assert all(result.acquired for result in results)


# -- state loss ----------------------------------------------------------------------

GRACE_MS = 1_500
KEY = LockKey("svc", "dom")


async def test_lost_keys_refuse_the_holder_and_everyone_for_the_grace_period(
    redis_url: str, prefix: str
) -> None:
    store = make_store(GRACE_MS, url=redis_url, key_prefix=prefix)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await store.start()
        await asyncio.sleep(GRACE_MS / 1000)  # the fresh prefix's own grace period
        first = await store.acquire(KEY, "alice", 30_000)
        assert first.acquired
        await admin.delete(*await keys_of(redis_url, f"{prefix}:*"))  # the data is gone
        assert not (await store.keep_alive(KEY, "alice", 30_000)).renewed
        refused = await store.acquire(KEY, "bob", 30_000)
        assert refused.grace and 0 < refused.ttl_ms <= GRACE_MS
        await asyncio.sleep(refused.ttl_ms / 1000 + 0.1)
        second = await store.acquire(KEY, "bob", 30_000)
        assert second.acquired and second.token > first.token
    finally:
        await admin.aclose()
        await store.close()


async def test_another_server_id_means_possibly_stale_data(redis_url: str, prefix: str) -> None:
    """A restart from a snapshot or a replica taking over shows as another run_id."""
    store = make_store(GRACE_MS, url=redis_url, key_prefix=prefix)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await store.start()
        await asyncio.sleep(GRACE_MS / 1000)
        assert (await store.acquire(KEY, "alice", 30_000)).acquired
        await admin.hset(f"{prefix}:state", "run_id", "0" * 40)
        # The restored lease is still there, but it can no longer be trusted.
        assert not (await store.keep_alive(KEY, "alice", 30_000)).renewed
        assert (await store.acquire(KEY, "alice", 30_000)).grace
        assert await admin.hget(f"{prefix}:state", "reason") == b"run_id"
    finally:
        await admin.aclose()
        await store.close()


async def until_replicated(replica_url: str, key: str) -> None:
    """Until the replica at `replica_url` is in sync with its primary and holds `key`."""
    replica = aioredis.Redis.from_url(replica_url, decode_responses=True)
    try:
        async with asyncio.timeout(30):
            while True:
                info = await replica.info("replication")
                if (
                    info.get("master_link_status") == "up"
                    and not info.get("master_sync_in_progress")
                    and await replica.exists(key)
                ):
                    return
                await asyncio.sleep(0.05)
    finally:
        await replica.aclose()


async def test_a_primary_demoted_and_promoted_again_before_resyncing_starts_a_grace_period(
    prefix: str,
) -> None:
    """The same server process (same run_id) can still have lost writes: here a replica
    took over and granted a lease, then died before the old primary, told to follow it,
    could copy anything; the old primary is made primary again, without that lease."""
    with (
        RedisProcess() as first,
        RedisProcess("--replicaof", "127.0.0.1", str(first.port)) as second,
    ):
        on_first = make_store(0, url=first.url, key_prefix=prefix)  # no grace: start now
        on_second = make_store(0, url=second.url, key_prefix=prefix)
        admin_first = aioredis.Redis.from_url(first.url)
        admin_second = aioredis.Redis.from_url(second.url)
        try:
            await on_first.start()  # the marker is written on the first primary
            await until_replicated(second.url, f"{prefix}:state")
            await admin_second.replicaof("NO", "ONE")  # a failover to the replica
            assert (await on_second.acquire(KEY, "alice", 60_000)).acquired
            second.kill()  # the new primary dies; the old one is told to follow it, ...
            await admin_first.replicaof("127.0.0.1", second.port)
            await admin_first.replicaof("NO", "ONE")  # ... and becomes primary again
            on_first.grace_ms = 60_000
            # alice still believes she leads: nothing may be granted yet.
            refused = await on_first.acquire(KEY, "bob", 60_000)
            assert refused.grace and not refused.acquired
            assert await admin_first.hget(f"{prefix}:state", "reason") == b"promoted"
        finally:
            await admin_first.aclose()
            await admin_second.aclose()
            await on_first.close()
            await on_second.close()


async def test_replicas_coming_and_going_do_not_start_a_grace_period(prefix: str) -> None:
    """A primary takes a new replication ID when its first replica attaches and when it
    frees its backlog after `repl-backlog-ttl` without replicas; neither loses a write."""
    with RedisProcess("--repl-backlog-ttl", "1") as primary:
        store = make_store(0, url=primary.url, key_prefix=prefix)
        admin = aioredis.Redis.from_url(primary.url, decode_responses=True)
        try:
            await store.start()
            store.grace_ms = 60_000
            assert (await store.acquire(KEY, "alice", 60_000)).acquired
            replication_id = (await admin.info("replication"))["master_replid"]
            with RedisProcess("--replicaof", "127.0.0.1", str(primary.port)) as replica:
                await until_replicated(replica.url, f"{prefix}:state")
                assert (await admin.info("replication"))["master_replid"] != replication_id
                assert await store.check_state() == 0
                assert (await store.keep_alive(KEY, "alice", 60_000)).renewed
                replication_id = (await admin.info("replication"))["master_replid"]
            async with asyncio.timeout(30):  # the backlog is freed, a second after
                while (await admin.info("replication"))["repl_backlog_active"]:
                    await asyncio.sleep(0.1)
            assert (await admin.info("replication"))["master_replid"] != replication_id
            assert await store.check_state() == 0
            assert (await store.keep_alive(KEY, "alice", 60_000)).renewed
        finally:
            await admin.aclose()
            await store.close()


async def test_a_replica_refuses_as_read_only(prefix: str) -> None:
    with (
        RedisProcess() as primary,
        RedisProcess("--replicaof", "127.0.0.1", str(primary.port)) as replica,
    ):
        on_primary = make_store(0, url=primary.url, key_prefix=prefix)
        on_replica = make_store(0, url=replica.url, key_prefix=prefix)
        try:
            await on_primary.start()
            await until_replicated(replica.url, f"{prefix}:state")
            with pytest.raises(StoreUnavailable, match="READONLY"):
                await on_replica.check_state()
            with pytest.raises(StoreUnavailable, match="READONLY"):
                await on_replica.keep_alive(KEY, "alice", 10_000)
        finally:
            await on_primary.close()
            await on_replica.close()


async def test_an_evicting_redis_is_refused_at_start_and_by_the_health_probe() -> None:
    """Under any policy but noeviction Redis may evict a lease (it has a TTL) while the
    state marker stays: the lock would be granted again with no grace period."""
    with RedisProcess("--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru") as server:
        admin = aioredis.Redis.from_url(server.url)
        refused = make_store(url=server.url)
        try:
            with pytest.raises(StoreUnavailable, match="maxmemory-policy is volatile-lru"):
                await refused.start()
            await admin.config_set("maxmemory-policy", "noeviction")
            store = make_store(url=server.url)
            await store.start()
            try:
                await admin.config_set("maxmemory-policy", "allkeys-lru")
                with pytest.raises(StoreUnavailable, match="noeviction"):
                    await store.ping()
                await admin.config_set("maxmemory-policy", "noeviction")
                await store.ping()
            finally:
                await store.close()
        finally:
            await refused.close()
            await admin.aclose()


async def test_a_redis_that_refuses_writes_fails_the_health_probe() -> None:
    """A full Redis under noeviction still answers every read, but refuses every grant:
    health must say so, not only that Redis answers."""
    with RedisProcess() as server:
        admin = aioredis.Redis.from_url(server.url)
        store = make_store(url=server.url)
        try:
            await store.start()
            await store.ping()
            await admin.config_set("maxmemory", 1)  # every write is over the limit now
            with pytest.raises(StoreUnavailable, match="OOM"):
                await store.acquire(KEY, "alice", 10_000)
            with pytest.raises(StoreUnavailable, match="OOM"):
                await store.ping()
            await admin.config_set("maxmemory", 0)
            await store.ping()
            assert (await store.acquire(KEY, "alice", 10_000)).acquired
            assert await keys_of(server.url, "*probe*") == []  # the probe leaves nothing
        finally:
            await store.close()
            await admin.aclose()


async def test_a_read_only_replica_fails_the_health_probe(prefix: str) -> None:
    with (
        RedisProcess() as primary,
        RedisProcess("--replicaof", "127.0.0.1", str(primary.port)) as replica,
    ):
        on_primary = make_store(0, url=primary.url, key_prefix=prefix)
        on_replica = make_store(0, url=replica.url, key_prefix=prefix)
        try:
            await on_primary.start()
            await until_replicated(replica.url, f"{prefix}:state")
            with pytest.raises(StoreUnavailable, match="replica"):
                await on_replica.ping()
        finally:
            await on_primary.close()
            await on_replica.close()


async def test_the_grace_period_is_shared_by_every_instance(redis_url: str, prefix: str) -> None:
    first = make_store(GRACE_MS, url=redis_url, key_prefix=prefix)
    second = make_store(GRACE_MS, url=redis_url, key_prefix=prefix)
    try:
        await first.start()
        await second.start()
        assert 0 < await second.check_state() <= GRACE_MS
        assert (await second.acquire(KEY, "bob", 30_000)).grace
    finally:
        await first.close()
        await second.close()


async def test_a_batch_renewal_is_refused_during_the_grace_period(
    redis_url: str, prefix: str
) -> None:
    store = make_store(GRACE_MS, url=redis_url, key_prefix=prefix)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await store.start()
        await asyncio.sleep(GRACE_MS / 1000)
        keys = [LockKey("svc", f"shard-{n}") for n in range(3)]
        for key in keys:
            assert (await store.acquire(key, "alice", 30_000)).acquired
        await admin.delete(f"{prefix}:state")
        renewals = await store.keep_alive_many(keys, "alice", 30_000)
        assert [renewal.renewed for renewal in renewals] == [False, False, False]
    finally:
        await admin.aclose()
        await store.close()


async def test_release_notifications_resume_after_a_redis_restart() -> None:
    with RedisProcess() as server:
        store = make_store(url=server.url)
        released: asyncio.Queue[LockKey] = asyncio.Queue()
        store.notify_releases(released.put_nowait)
        await store.start()
        try:
            key = LockKey("svc", "a:b/c")  # characters the published name must carry
            for moment in ("before", "after"):
                if moment == "after":
                    server.restart()
                    await asyncio.sleep(SUBSCRIBER_POLL_S * 2.5)  # lost, then subscribed again
                granted = await store.acquire(key, "alice", 10_000)
                assert granted.acquired
                await store.expect_release(key, 5_000)
                await asyncio.sleep(0.2)  # a subscriber that is back in time to hear it
                assert await store.release(key, "alice", granted.token)
                assert await asyncio.wait_for(released.get(), timeout=SUBSCRIBER_POLL_S * 5) == key
        finally:
            await store.close()


async def until_subscribed(url: str, channel: str) -> None:
    """Until someone listens on `channel` (the store's subscriber, started by `start`)."""
    admin = aioredis.Redis.from_url(url)
    try:
        async with asyncio.timeout(30):
            while not dict(await admin.pubsub_numsub(channel))[channel.encode()]:
                await asyncio.sleep(0.05)
    finally:
        await admin.aclose()


async def test_the_release_subscriber_survives_a_malformed_message_and_a_failing_callback(
    redis_url: str, prefix: str
) -> None:
    store = make_store(url=redis_url, key_prefix=prefix)
    released: asyncio.Queue[LockKey] = asyncio.Queue()
    failing = LockKey("svc", "callback-fails")

    def hand_over(key: LockKey) -> None:
        if key == failing:
            raise RuntimeError("a waiter's callback failed")
        released.put_nowait(key)

    store.notify_releases(hand_over)
    admin = aioredis.Redis.from_url(redis_url)
    await store.start()
    try:
        channel = f"{prefix}:released"
        await until_subscribed(redis_url, channel)
        assert await admin.publish(channel, b"\xff\xfe:\x80") == 1  # not UTF-8
        for key in (failing, KEY):
            granted = await store.acquire(key, "alice", 10_000)
            await store.expect_release(key, 5_000)
            assert await store.release(key, "alice", granted.token)
        # Messages on one channel arrive in order: this one came after both bad ones.
        assert await asyncio.wait_for(released.get(), timeout=30) == KEY
    finally:
        await admin.aclose()
        await store.close()


async def test_a_shorter_wait_never_shortens_another_waiters_flag(
    redis_url: str, prefix: str
) -> None:
    store = make_store(url=redis_url, key_prefix=prefix)
    store.notify_releases(lambda key: None)
    admin = aioredis.Redis.from_url(redis_url)
    await store.start()
    try:
        long_first, short_first = LockKey("svc", "long-first"), LockKey("svc", "short-first")
        await store.expect_release(long_first, 60_000)
        await store.expect_release(long_first, 100)
        await store.expect_release(short_first, 100)
        await store.expect_release(short_first, 60_000)
        for key in (long_first, short_first):
            # 61 s at first; well over 1.1 s unless shortened by the 100 ms wait
            flag = f"{prefix}:{{{key.service}:{key.domain}}}:waiting"
            assert await admin.pttl(flag) > 30_000
    finally:
        await admin.aclose()
        await store.close()


async def test_no_subscription_and_no_waiting_flag_without_a_listener(
    redis_url: str, prefix: str
) -> None:
    store = make_store(url=redis_url, key_prefix=prefix)
    await store.start()
    try:
        key = LockKey("svc", "dom")
        await store.expect_release(key, 5_000)
        assert await keys_of(redis_url, f"{prefix}:*waiting") == []
    finally:
        await store.close()
