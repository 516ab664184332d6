"""The embedded store: lock state in this process's memory.

For development and single-instance use only. The state lives in one process, so
several service instances must NOT share it, and a restart forgets every lease.
Expiry is judged on the monotonic clock. Every operation runs without awaiting,
so on the single event loop each one is atomic.

A new store cannot know whether a previous process had granted leases that are
still believed in, so `start()` always begins the state-loss grace period. A closed
store (swapped out by a reload) answers every call with `StoreUnavailable`: its leases
are gone for the service, so it must never grant or renew one again.

The leadership watch hears every grant and release as it happens (`follow`, called
inside the operation, so in order); expiry it finds by reading a lock at its lease end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loguru import logger

from quorum_quest.errors import StoreUnavailable
from quorum_quest.stores.base import (
    Acquisition,
    GracePeriod,
    Holder,
    LockChange,
    LockKey,
    LockStore,
    Renewal,
    StoreSettings,
)

_SWEEP_INTERVAL_S = 1.0


@dataclass(slots=True)
class _Lease:
    holder: str
    token: int
    deadline: float  # time.monotonic() seconds


class MemoryStore(LockStore):
    backend = "memory"
    settings_model = StoreSettings
    tells_changes = True

    def __init__(self, settings: StoreSettings, *, grace_ms: int = 0) -> None:
        super().__init__(settings, grace_ms=grace_ms)
        self._leases: dict[LockKey, _Lease] = {}
        # One counter for every lock: a token larger than all tokens issued so far is
        # larger than all tokens issued for any one lock. It starts at the wall clock in
        # microseconds so that tokens keep rising across a restart of this process.
        self._last_token = time.time_ns() // 1000
        self._next_sweep = 0.0
        self._grace = GracePeriod(self.backend)
        self._closed = False
        self._followers: list[Callable[[LockChange], None]] = []

    async def start(self) -> None:
        self._grace.begin(self.grace_ms)
        if self.grace_ms:
            logger.warning(
                "memory store started with no lock state: refusing new grants for {:g} s "
                "(state-loss grace period), since leases granted by an earlier process "
                "may still be believed in",
                self.grace_ms / 1000,
            )

    async def close(self) -> None:
        self._closed = True
        self._leases.clear()

    def _open(self) -> None:
        if self._closed:
            raise StoreUnavailable(self.backend, "the store is closed")

    async def ping(self) -> None:
        self._open()

    async def check_state(self) -> int:
        self._open()
        return self._grace.left_ms()

    def _live(self, key: LockKey, now: float) -> _Lease | None:
        lease = self._leases.get(key)
        if lease is not None and lease.deadline <= now:
            del self._leases[key]
            return None
        return lease

    def _sweep(self, now: float) -> None:
        """Forget expired leases nobody asked about again, at most once a second."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_INTERVAL_S
        expired = [key for key, lease in self._leases.items() if lease.deadline <= now]
        for key in expired:
            del self._leases[key]

    async def acquire(self, key: LockKey, client_id: str, ttl_ms: int) -> Acquisition:
        self._open()
        now = time.monotonic()
        if left := self._grace.left_ms(now):
            return Acquisition.grace_refusal(left)
        self._sweep(now)
        lease = self._live(key, now)
        if lease is None:
            self._last_token += 1
            lease = _Lease(client_id, self._last_token, now + ttl_ms / 1000)
            self._leases[key] = lease
            self._tell(LockChange(key, client_id, lease.token, ttl_ms))
            return Acquisition(True, client_id, lease.token, ttl_ms)
        if lease.holder == client_id:
            lease.deadline = now + ttl_ms / 1000
            return Acquisition(True, client_id, lease.token, ttl_ms, refreshed=True)
        return Acquisition(False, lease.holder, lease.token, _remaining_ms(lease, now))

    async def keep_alive(self, key: LockKey, client_id: str, ttl_ms: int) -> Renewal:
        self._open()
        return self._renew(key, client_id, ttl_ms, time.monotonic())

    async def keep_alive_many(
        self, keys: Sequence[LockKey], client_id: str, ttl_ms: int
    ) -> list[Renewal]:
        self._open()
        now = time.monotonic()
        return [self._renew(key, client_id, ttl_ms, now) for key in keys]

    def _renew(self, key: LockKey, client_id: str, ttl_ms: int, now: float) -> Renewal:
        if self._grace.left_ms(now):
            return Renewal(False)
        lease = self._live(key, now)
        if lease is None or lease.holder != client_id:
            return Renewal(False)
        lease.deadline = now + ttl_ms / 1000
        return Renewal(True, lease.token)

    async def release(self, key: LockKey, client_id: str, token: int = 0) -> bool:
        self._open()
        lease = self._live(key, time.monotonic())
        if lease is None or lease.holder != client_id or token not in (0, lease.token):
            return False
        del self._leases[key]
        self._tell(LockChange(key, "", lease.token))
        return True

    def _tell(self, change: LockChange) -> None:
        for changed in self._followers:
            try:
                changed(change)
            except Exception:  # a reader's failure must never fail the operation
                logger.exception("memory store: telling a watcher of {} failed", change.key)

    async def follow(
        self, changed: Callable[[LockChange], None], synced: Callable[[], None]
    ) -> None:
        self._open()
        self._followers.append(changed)
        try:
            synced()
            await asyncio.Event().wait()  # until cancelled
        finally:
            self._followers.remove(changed)

    async def get_leaders(self, keys: Sequence[LockKey]) -> list[Holder | None]:
        return [await self.get_leader(key) for key in keys]

    async def leaders(self, service: str) -> dict[LockKey, Holder]:
        self._open()
        now = time.monotonic()
        return {
            key: Holder(lease.holder, lease.token, _remaining_ms(lease, now))
            for key, lease in self._leases.items()
            if key.service == service and lease.deadline > now
        }

    async def get_leader(self, key: LockKey) -> Holder | None:
        self._open()
        now = time.monotonic()
        lease = self._live(key, now)
        if lease is None:
            return None
        return Holder(lease.holder, lease.token, _remaining_ms(lease, now))


def _remaining_ms(lease: _Lease, now: float) -> int:
    return max(0, int((lease.deadline - now) * 1000))
