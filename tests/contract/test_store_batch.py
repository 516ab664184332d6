"""`keep_alive_many`, the batched renewal: every backend passes these (see `BACKENDS`)."""

from __future__ import annotations

import asyncio
import uuid

from quorum_quest.stores import LockKey, LockStore

SHORT_MS = 300
# Leases a test needs alive: no machine is slow enough to see them end during the test
# (a renewal to LONGER_MS shows as more than LONG_MS left).
LONG_MS = 30_000
LONGER_MS = 4 * LONG_MS
LARGE_BATCH = 1_000
BATCH_HELD_MS = 600_000  # longer than any test may run (pytest's timeout)


def fresh_keys(count: int) -> list[LockKey]:
    service = "svc-" + uuid.uuid4().hex[:8]
    return [LockKey(service, f"shard-{n}") for n in range(count)]


async def expire(ttl_ms: int = SHORT_MS) -> None:
    await asyncio.sleep(ttl_ms / 1000 + 0.15)


async def acquire_all(store: LockStore, keys: list[LockKey], client_id: str, ttl_ms: int) -> dict:
    """Acquire every key for `client_id` (a few calls at a time); their tokens by key."""
    calls = asyncio.Semaphore(32)

    async def acquire(key: LockKey) -> int:
        async with calls:
            result = await store.acquire(key, client_id, ttl_ms)
        assert result.acquired, key
        return result.token

    tokens = await asyncio.gather(*(acquire(key) for key in keys))
    return dict(zip(keys, tokens, strict=True))


async def test_keep_alive_many_of_no_locks_answers_nothing(store: LockStore) -> None:
    assert await store.keep_alive_many([], "alice", LONG_MS) == []


async def test_keep_alive_many_renews_only_the_callers_live_leases(store: LockStore) -> None:
    mine, theirs, free = fresh_keys(3)
    granted = await store.acquire(mine, "alice", LONG_MS)
    await store.acquire(theirs, "bob", SHORT_MS)
    renewals = await store.keep_alive_many([mine, theirs, free], "alice", LONGER_MS)
    assert [renewal.renewed for renewal in renewals] == [True, False, False]
    assert renewals[0].token == granted.token
    await expire()  # past bob's lease: had it been extended, it would still be held
    holder = await store.get_leader(mine)
    assert holder is not None and (holder.client_id, holder.token) == ("alice", granted.token)
    assert holder.remaining_ms > LONG_MS  # past the first lease: renewed to the new length
    assert await store.get_leader(theirs) is None  # bob's lease was not extended
    assert await store.get_leader(free) is None  # and nothing was created


async def test_keep_alive_many_never_revives_expired_or_released_leases(
    store: LockStore,
) -> None:
    expired, released, live = fresh_keys(3)
    await store.acquire(expired, "alice", SHORT_MS)
    await store.acquire(released, "alice", LONG_MS)
    await store.acquire(live, "alice", LONG_MS)
    assert await store.release(released, "alice")
    await expire()
    renewals = await store.keep_alive_many([expired, released, live], "alice", LONG_MS)
    assert [renewal.renewed for renewal in renewals] == [False, False, True]
    assert await store.get_leader(expired) is None
    assert await store.get_leader(released) is None
    assert (await store.acquire(expired, "bob", LONG_MS)).acquired


async def test_keep_alive_many_answers_mixed_results_in_request_order(store: LockStore) -> None:
    keys = fresh_keys(8)
    tokens = {}
    for index, key in enumerate(keys):
        owner = "alice" if index % 2 == 0 else "bob"
        tokens[key] = (await store.acquire(key, owner, LONG_MS)).token
    renewals = await store.keep_alive_many(keys, "alice", LONG_MS)
    assert [renewal.renewed for renewal in renewals] == [True, False] * 4
    for key, renewal in zip(keys, renewals, strict=True):
        if renewal.renewed:
            assert renewal.token == tokens[key]
    for key in keys[1::2]:  # bob's locks are still bob's
        holder = await store.get_leader(key)
        assert holder is not None and holder.client_id == "bob"


async def test_keep_alive_many_renews_a_large_batch(store: LockStore) -> None:
    keys = fresh_keys(LARGE_BATCH)
    # Granting and renewing a thousand locks takes long on a loaded machine; these leases
    # outlast the test's own time limit, so no step depends on speed.
    tokens = await acquire_all(store, keys, "alice", BATCH_HELD_MS)
    gone = keys[::100]  # a few leases released behind the batch's back
    for key in gone:
        assert await store.release(key, "alice")
    renewals = await store.keep_alive_many(keys, "alice", 2 * BATCH_HELD_MS)
    assert len(renewals) == len(keys)
    for key, renewal in zip(keys, renewals, strict=True):
        if key in gone:
            assert not renewal.renewed
        else:
            assert renewal.renewed and renewal.token == tokens[key]
    for key in keys[1::97]:  # a sample: renewed to the new length
        holder = await store.get_leader(key)
        assert holder is not None and holder.remaining_ms > BATCH_HELD_MS
