"""The watch hub on its own: polling a store that tells no changes, a state-loss grace
period and a store swapped by a reload reported as LOST, and one store feed shared by
every watch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from quorum_quest.server.watch import Change, Watch, WatchClosed, WatchHub
from quorum_quest.stores import LockKey, StoreSettings
from quorum_quest.stores.memory import MemoryStore

BUDGET_S = 30.0
KEY = LockKey("svc", "dom")


class PollingStore(MemoryStore):
    """The memory store, as a store that tells nothing (ScyllaDB, DynamoDB) is seen."""

    tells_changes = False


class Runtime:
    def __init__(self, store: MemoryStore) -> None:
        self.current: Any = SimpleNamespace(
            store=store, settings=SimpleNamespace(server=SimpleNamespace(watchInterval=0.05))
        )
        self.grace = 0

    def grace_left_ms(self) -> int:
        return self.grace

    def note_grace(self, left_ms: int) -> None:
        self.grace = left_ms


async def started(store: MemoryStore) -> MemoryStore:
    await store.start()
    return store


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    yield Runtime(await started(MemoryStore(StoreSettings())))


async def next_change(changes: AsyncIterator[Change]) -> Change:
    async with asyncio.timeout(BUDGET_S):
        return await anext(changes)


async def opened(hub: WatchHub, *keys: LockKey, service: str | None = None) -> Watch:
    return await hub.open(keys, service, {}, lambda key: True)


async def test_a_store_that_tells_nothing_is_polled() -> None:
    store = await started(PollingStore(StoreSettings()))
    hub = WatchHub(Runtime(store))  # type: ignore[arg-type]
    watch = await opened(hub, KEY)
    changes = watch.changes()
    try:
        assert (await next_change(changes)).kind == "current"
        granted = await store.acquire(KEY, "a", 30_000)
        change = await next_change(changes)
        assert (change.kind, change.holder, change.token) == ("granted", "a", granted.token)
        await store.release(KEY, "a")
        assert (await next_change(changes)).kind == "released"
        await store.acquire(KEY, "b", 100)
        assert (await next_change(changes)).kind == "granted"
        assert (await next_change(changes)).kind == "expired"
    finally:
        hub.leave(watch)


async def test_a_grace_period_reports_every_held_lock_lost(runtime: Runtime) -> None:
    hub = WatchHub(runtime)  # type: ignore[arg-type]
    await runtime.current.store.acquire(KEY, "a", 30_000)
    watch = await opened(hub, KEY)
    changes = watch.changes()
    try:
        assert (await next_change(changes)).holder == "a"
        runtime.grace = 60_000
        change = await next_change(changes)
        assert (change.kind, change.holder) == ("lost", "")
    finally:
        hub.leave(watch)


async def test_a_swapped_store_reports_the_old_leases_lost_and_follows_the_new(
    runtime: Runtime,
) -> None:
    hub = WatchHub(runtime)  # type: ignore[arg-type]
    await runtime.current.store.acquire(KEY, "old", 30_000)
    watch = await opened(hub, KEY)
    changes = watch.changes()
    try:
        assert (await next_change(changes)).holder == "old"
        new = await started(MemoryStore(StoreSettings()))
        runtime.current = SimpleNamespace(store=new, settings=runtime.current.settings)
        assert (await next_change(changes)).kind == "lost"
        await new.acquire(KEY, "new", 30_000)
        change = await next_change(changes)
        assert (change.kind, change.holder) == ("granted", "new")
    finally:
        hub.leave(watch)


async def test_every_watch_shares_one_feed_which_stops_with_the_last(runtime: Runtime) -> None:
    hub = WatchHub(runtime)  # type: ignore[arg-type]
    store = runtime.current.store
    watches = [await opened(hub, KEY) for _ in range(100)]
    assert len(store._followers) == 1
    await store.acquire(KEY, "a", 30_000)
    for watch in watches:
        # Not read before the grant: the first state was replaced by the newer one.
        change = await next_change(watch.changes())
        assert (change.kind, change.holder, change.gap) == ("granted", "a", True)
    for watch in watches:
        hub.leave(watch)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert store._followers == []
    assert not hub._known and not hub._timers


async def test_close_ends_every_watch(runtime: Runtime) -> None:
    hub = WatchHub(runtime)  # type: ignore[arg-type]
    watch = await opened(hub, KEY, service="svc")
    changes = watch.changes()
    assert (await next_change(changes)).kind == "current"
    await hub.close()
    with pytest.raises(WatchClosed):
        await next_change(changes)
