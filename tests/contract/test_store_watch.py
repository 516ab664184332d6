"""What the stores give the leadership watch: changes told (`follow`), many locks read at
once (`get_leaders`), and the held locks of a service (`leaders`).

Memory and Redis tell changes; every store lists a service's locks and reads many locks
(the watch polls ScyllaDB and DynamoDB with them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from quorum_quest.stores import LockChange, LockKey, LockStore, store_class
from tests.conftest import make_settings

BUDGET_S = 30.0

TELLING = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


# Stores that list a service's locks; the watch polls DynamoDB.
LISTING = [
    *TELLING,
    pytest.param("dynamodb-moto", id="dynamodb-moto", marks=pytest.mark.dynamodb),
    pytest.param("scylladb", id="scylladb", marks=pytest.mark.scylladb),
]


async def _started(request: pytest.FixtureRequest) -> LockStore:
    config: dict[str, Any] = {}
    if request.param != "memory":
        config = request.getfixturevalue(f"{request.param.replace('-', '_')}_store_config")
    backend = request.param.partition("-")[0]
    store = store_class(backend)(make_settings(backend, config).store_settings())
    await store.start()
    return store


@pytest.fixture(params=TELLING)
async def telling_store(request: pytest.FixtureRequest) -> AsyncIterator[LockStore]:
    store = await _started(request)
    yield store
    await store.close()


@pytest.fixture(params=LISTING)
async def listing_store(request: pytest.FixtureRequest) -> AsyncIterator[LockStore]:
    store = await _started(request)
    yield store
    await store.close()


async def test_follow_tells_grants_and_releases_in_order_but_not_renewals(
    telling_store: LockStore,
) -> None:
    store = telling_store
    assert store.tells_changes
    told: asyncio.Queue[LockChange] = asyncio.Queue()
    listening = asyncio.Event()
    follower = asyncio.ensure_future(store.follow(told.put_nowait, listening.set))
    key = LockKey("svc: with space", "dom*ain")
    try:
        async with asyncio.timeout(BUDGET_S):
            await listening.wait()
        first = await store.acquire(key, "holder one", 30_000)
        assert (await store.keep_alive(key, "holder one", 30_000)).renewed
        assert await store.release(key, "holder one", first.token)
        second = await store.acquire(key, "two", 30_000)
        async with asyncio.timeout(BUDGET_S):
            changes = [await told.get() for _ in range(3)]
        assert changes == [
            LockChange(key, "holder one", first.token, 30_000),
            LockChange(key, "", first.token, 0),
            LockChange(key, "two", second.token, 30_000),
        ]
        await asyncio.sleep(0.1)
        assert told.empty()  # the renewal and the refreshes told nothing
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


async def test_leaders_lists_the_held_locks_of_one_service_only(listing_store: LockStore) -> None:
    store = listing_store
    held = {LockKey("a:b*", f"d{n}") for n in range(5)}
    for key in held:
        assert (await store.acquire(key, "c", 30_000)).acquired
    await store.acquire(LockKey("a", "b*:d0"), "other service", 30_000)
    await store.acquire(LockKey("a:b*x", "d0"), "other service", 30_000)
    released = LockKey("a:b*", "gone")
    token = (await store.acquire(released, "c", 30_000)).token
    await store.release(released, "c", token)
    leaders = await store.leaders("a:b*")
    assert set(leaders) == held
    assert all(holder.client_id == "c" and holder.remaining_ms > 0 for holder in leaders.values())


async def test_get_leaders_reads_many_locks_in_order(listing_store: LockStore) -> None:
    store = listing_store
    keys = [LockKey("many", f"d{n}") for n in range(10)]
    tokens = {}
    for key in keys[::2]:
        tokens[key] = (await store.acquire(key, "c", 30_000)).token
    holders = await store.get_leaders(keys)
    for key, holder in zip(keys, holders, strict=True):
        if key in tokens:
            assert holder is not None and holder.token == tokens[key]
        else:
            assert holder is None
