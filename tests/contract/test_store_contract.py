"""The store contract: every backend passes exactly these tests (see `BACKENDS`)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from quorum_quest.stores import LockKey, LockStore, store_class
from tests.conftest import make_settings

SHORT_MS = 300
# Leases a test needs alive: no machine is slow enough to see them end during the test
# (a renewal or refresh to LONGER_MS shows as more than LONG_MS left).
LONG_MS = 30_000
LONGER_MS = 4 * LONG_MS


def fresh_key() -> LockKey:
    return LockKey("svc-" + uuid.uuid4().hex[:8], "dom")


async def expire(ttl_ms: int = SHORT_MS) -> None:
    await asyncio.sleep(ttl_ms / 1000 + 0.15)


async def test_acquire_free_lock_grants_it_with_a_token(store: LockStore) -> None:
    result = await store.acquire(fresh_key(), "alice", LONG_MS)
    assert result.acquired and not result.refreshed
    assert result.holder == "alice"
    assert result.token > 0
    assert result.ttl_ms == LONG_MS


async def test_acquire_by_holder_refreshes_with_same_token(store: LockStore) -> None:
    key = fresh_key()
    first = await store.acquire(key, "alice", LONG_MS)
    again = await store.acquire(key, "alice", LONGER_MS)
    assert again.acquired and again.refreshed
    assert again.token == first.token
    holder = await store.get_leader(key)
    assert holder is not None and (holder.client_id, holder.token) == ("alice", first.token)
    assert holder.remaining_ms > LONG_MS  # past the first lease: refreshed to the new length


async def test_acquire_held_by_other_names_the_holder(store: LockStore) -> None:
    key = fresh_key()
    granted = await store.acquire(key, "alice", LONG_MS)
    refused = await store.acquire(key, "bob", LONG_MS)
    assert not refused.acquired
    assert refused.holder == "alice"
    assert refused.token == granted.token
    assert 0 < refused.ttl_ms <= LONG_MS


async def test_expired_lock_is_granted_to_another_with_a_larger_token(store: LockStore) -> None:
    key = fresh_key()
    first = await store.acquire(key, "alice", SHORT_MS)
    await expire()
    second = await store.acquire(key, "bob", LONG_MS)
    assert second.acquired and second.holder == "bob"
    assert second.token > first.token


async def test_keep_alive_extends_the_holders_lease(store: LockStore) -> None:
    key = fresh_key()
    granted = await store.acquire(key, "alice", LONG_MS)
    renewal = await store.keep_alive(key, "alice", LONGER_MS)
    assert renewal.renewed and renewal.token == granted.token
    holder = await store.get_leader(key)
    assert holder is not None and holder.client_id == "alice"
    assert holder.remaining_ms > LONG_MS  # past the first lease: renewed to the new length


async def test_keep_alive_by_non_holder_is_refused_and_changes_nothing(store: LockStore) -> None:
    key = fresh_key()
    await store.acquire(key, "alice", SHORT_MS)
    renewal = await store.keep_alive(key, "bob", LONG_MS)
    assert not renewal.renewed
    await expire()
    assert await store.get_leader(key) is None


async def test_keep_alive_after_expiry_does_not_revive_lock(store: LockStore) -> None:
    key = fresh_key()
    await store.acquire(key, "alice", SHORT_MS)
    await expire()
    assert not (await store.keep_alive(key, "alice", LONG_MS)).renewed
    assert await store.get_leader(key) is None
    assert (await store.acquire(key, "bob", LONG_MS)).acquired


async def test_keep_alive_after_release_does_not_revive_lock(store: LockStore) -> None:
    key = fresh_key()
    await store.acquire(key, "alice", LONG_MS)
    assert await store.release(key, "alice")
    assert not (await store.keep_alive(key, "alice", LONG_MS)).renewed
    assert await store.get_leader(key) is None


async def test_release_by_holder_frees_the_lock(store: LockStore) -> None:
    key = fresh_key()
    await store.acquire(key, "alice", LONG_MS)
    assert await store.release(key, "alice") is True
    assert await store.get_leader(key) is None
    assert (await store.acquire(key, "bob", LONG_MS)).acquired


async def test_release_by_non_holder_changes_nothing(store: LockStore) -> None:
    key = fresh_key()
    granted = await store.acquire(key, "alice", LONG_MS)
    assert await store.release(key, "bob") is False
    holder = await store.get_leader(key)
    assert holder is not None and (holder.client_id, holder.token) == ("alice", granted.token)


async def test_release_naming_another_token_changes_nothing(store: LockStore) -> None:
    """A release that arrives late, for an older lease of the same client, frees nothing."""
    key = fresh_key()
    old = await store.acquire(key, "alice", LONG_MS)
    assert await store.release(key, "alice", old.token)
    new = await store.acquire(key, "alice", LONG_MS)
    assert new.token > old.token
    assert await store.release(key, "alice", old.token) is False
    holder = await store.get_leader(key)
    assert holder is not None and holder.token == new.token
    assert await store.release(key, "alice", new.token) is True


@pytest.mark.parametrize("token", [2**63 - 1, 2**63, 2**64 - 1])
async def test_release_naming_a_token_beyond_any_issued_releases_nothing(
    store: LockStore, token: int
) -> None:
    """The wire's fencing_token is a uint64; no store issues tokens past int64, so such a
    release names no lease: a clean False, never an error."""
    key = fresh_key()
    granted = await store.acquire(key, "alice", LONG_MS)
    assert await store.release(key, "alice", token) is False
    assert await store.release(fresh_key(), "alice", token) is False
    holder = await store.get_leader(key)
    assert holder is not None and (holder.client_id, holder.token) == ("alice", granted.token)


async def test_release_is_idempotent(store: LockStore) -> None:
    key = fresh_key()
    await store.acquire(key, "alice", LONG_MS)
    assert await store.release(key, "alice") is True
    assert await store.release(key, "alice") is False
    assert await store.release(fresh_key(), "alice") is False


async def test_tokens_strictly_increase_across_release_and_expiry(store: LockStore) -> None:
    key = fresh_key()
    tokens = []
    for round_ in range(30):
        result = await store.acquire(key, f"client-{round_ % 3}", LONG_MS)
        assert result.acquired
        tokens.append(result.token)
        assert await store.release(key, f"client-{round_ % 3}")
    expiring = await store.acquire(key, "late", SHORT_MS)
    await expire()
    after_expiry = await store.acquire(key, "later", LONG_MS)
    tokens += [expiring.token, after_expiry.token]
    assert all(a < b for a, b in zip(tokens, tokens[1:], strict=False)), tokens


async def test_concurrent_acquires_grant_exactly_one(store: LockStore) -> None:
    key = fresh_key()
    results = await asyncio.gather(*(store.acquire(key, f"client-{n}", LONG_MS) for n in range(25)))
    winners = [r for r in results if r.acquired]
    assert len(winners) == 1
    assert {r.holder for r in results} == {winners[0].holder}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (LockKey("a:b", "c"), LockKey("a", "b:c")),
        (LockKey("a", "b}c"), LockKey("a}", "bc")),
        (LockKey("x%3Ay", "z"), LockKey("x:y", "z")),
        (LockKey("ünï", "cödé"), LockKey("ünï", "cöde")),
    ],
)
async def test_distinct_pairs_are_distinct_locks(
    store: LockStore, first: LockKey, second: LockKey
) -> None:
    # A fresh suffix on both domains keeps each pair's naive joins equal ("a:b:c<sfx>").
    suffix = uuid.uuid4().hex[:6]
    first = LockKey(first.service, first.domain + suffix)
    second = LockKey(second.service, second.domain + suffix)
    assert (await store.acquire(first, "alice", LONG_MS)).acquired
    assert (await store.acquire(second, "bob", LONG_MS)).acquired
    assert (await store.get_leader(first)).client_id == "alice"
    assert (await store.get_leader(second)).client_id == "bob"


async def test_get_leader_reports_holder_token_and_remaining(store: LockStore) -> None:
    key = fresh_key()
    assert await store.get_leader(key) is None
    granted = await store.acquire(key, "alice", LONG_MS)
    holder = await store.get_leader(key)
    assert holder is not None
    assert (holder.client_id, holder.token) == ("alice", granted.token)
    assert LONG_MS - 5_000 < holder.remaining_ms <= LONG_MS


async def test_ping_answers(store: LockStore) -> None:
    await store.ping()


# -- state loss ----------------------------------------------------------------------
# Each variant's `store_config` is fresh state (a new key prefix, table, or process),
# which a store cannot tell from lost state: it must start a grace period.

GRACE_MS = 1_200
# For tests that never wait for the end of a grace period: no slow machine outlasts it.
LONG_GRACE_MS = 60_000


async def started_store(backend: str, store_config: dict, grace_ms: int) -> LockStore:
    settings = make_settings(backend, store_config).store_settings()
    store = store_class(backend)(settings, grace_ms=grace_ms)
    await store.start()
    return store


async def test_fresh_state_refuses_every_grant_for_the_grace_period(
    backend: str, store_config: dict
) -> None:
    store = await started_store(backend, store_config, LONG_GRACE_MS)
    try:
        left = await store.check_state()
        assert 0 < left <= LONG_GRACE_MS
        key = fresh_key()
        refused = await store.acquire(key, "alice", LONG_MS)
        assert refused.grace and not refused.acquired
        assert (refused.holder, refused.token) == ("", 0)
        assert 0 < refused.ttl_ms <= LONG_GRACE_MS
        assert not (await store.keep_alive(key, "alice", LONG_MS)).renewed
    finally:
        await store.close()


async def test_grants_resume_when_the_grace_period_ends(backend: str, store_config: dict) -> None:
    store = await started_store(backend, store_config, GRACE_MS)
    try:
        await asyncio.sleep(await store.check_state() / 1000 + 0.1)
        assert await store.check_state() == 0
        granted = await store.acquire(fresh_key(), "alice", LONG_MS)
        assert granted.acquired and not granted.grace
    finally:
        await store.close()


async def test_grace_period_off_grants_at_once(backend: str, store_config: dict) -> None:
    store = await started_store(backend, store_config, 0)
    try:
        assert await store.check_state() == 0
        assert (await store.acquire(fresh_key(), "alice", LONG_MS)).acquired
    finally:
        await store.close()


async def test_a_grace_period_is_not_started_again_by_the_next_check(
    backend: str, store_config: dict
) -> None:
    store = await started_store(backend, store_config, 400)
    try:
        await asyncio.sleep(0.5)
        assert await store.check_state() == 0
        assert (await store.acquire(fresh_key(), "alice", LONG_MS)).acquired
    finally:
        await store.close()
