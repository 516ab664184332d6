"""What every call reads: one snapshot of settings, lease policy, store and telemetry.

A reload builds a new `Snapshot` and swaps it in whole; a call that started on the
old one finishes on it, so no call ever mixes two configurations. The old store
is closed once the calls still using it have finished.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from quorum_quest.config.settings import Settings
from quorum_quest.stores import LockKey, LockStore, store_class
from quorum_quest.telemetry.telemetry import Telemetry


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    """Lease lengths the service grants: `default` when the caller names none, never above `max`."""

    default_ttl_ms: int
    max_ttl_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> LeasePolicy:
        return cls(
            default_ttl_ms=int(settings.store_settings().ttl * 1000),
            max_ttl_ms=int(settings.server.maxTtl * 1000),
        )


def create_store(settings: Settings) -> LockStore:
    """A new, not yet started store for the configured backend."""
    return store_class(settings.backend.type)(
        settings.store_settings(), grace_ms=grace_ms(settings)
    )


def grace_ms(settings: Settings) -> int:
    """The store's state-loss grace period in ms."""
    return int(settings.server.state_loss_grace * 1000)


@dataclass(eq=False)
class Snapshot:
    """One configuration in force: read once at the start of every call."""

    settings: Settings
    store: LockStore
    telemetry: Telemetry
    policy: LeasePolicy = field(init=False)
    in_flight: int = field(default=0, init=False)
    _drained: asyncio.Event | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.policy = LeasePolicy.from_settings(self.settings)

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._drained is not None:
            self._drained.set()

    async def drained(self) -> None:
        """Return once no call is using this snapshot (call after it was swapped out)."""
        if self.in_flight:
            self._drained = asyncio.Event()
            await self._drained.wait()


class LeaseBook:
    """Leases granted or renewed through this instance that have not ended, by lock."""

    def __init__(self) -> None:
        self._deadlines: dict[LockKey, float] = {}
        self._prune_above = 1024

    def granted(self, key: LockKey, ttl_ms: int) -> None:
        self._deadlines[key] = time.monotonic() + ttl_ms / 1000
        if len(self._deadlines) > self._prune_above:
            self._prune()
            self._prune_above = max(1024, 2 * len(self._deadlines))

    def ended(self, key: LockKey) -> None:
        self._deadlines.pop(key, None)

    def _prune(self) -> None:
        now = time.monotonic()
        self._deadlines = {k: d for k, d in self._deadlines.items() if d > now}

    def __len__(self) -> int:
        self._prune()
        return len(self._deadlines)


class Releases:
    """Wakes acquire calls waiting on a lock when it is released.

    Releases through this instance wake waiters, and so do releases through other
    instances that the store tells of (`LockStore.notify_releases`); a waiter also
    wakes when the holder's lease is due to end or its own wait is over, and then
    asks the store again.
    """

    def __init__(self) -> None:
        self._waiting: dict[LockKey, tuple[asyncio.Event, int]] = {}
        self._closed = False

    async def wait(self, key: LockKey, timeout: float) -> None:
        """Return when `key` is released here, on `close()`, or after `timeout` s."""
        if self._closed:
            return
        event, waiters = self._waiting.get(key, (None, 0))
        if event is None:
            event = asyncio.Event()
        self._waiting[key] = (event, waiters + 1)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            current = self._waiting.get(key)
            if current is not None and current[0] is event:
                if current[1] == 1:
                    del self._waiting[key]
                else:
                    self._waiting[key] = (event, current[1] - 1)

    def released(self, key: LockKey) -> None:
        waiting = self._waiting.pop(key, None)
        if waiting is not None:
            waiting[0].set()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Wake every waiter and wait no more: the instance is shutting down."""
        self._closed = True
        for event, _ in self._waiting.values():
            event.set()
        self._waiting.clear()


class Runtime:
    """The snapshot in force, plus what outlives any one snapshot."""

    def __init__(self, current: Snapshot, leases: LeaseBook, started: float) -> None:
        self.current = current
        self.leases = leases
        self.releases = Releases()
        self.started = started
        self.reloads: Counter[str] = Counter()
        self.last_reload = ""
        self.store_reachable = True
        self._grace_until = 0.0  # time.monotonic() seconds

    def note_grace(self, left_ms: int) -> None:
        """Record what the store says is left of its state-loss grace period."""
        self._grace_until = time.monotonic() + left_ms / 1000 if left_ms > 0 else 0.0

    def grace_left_ms(self) -> int:
        """ms left of the store's grace period, as last reported (0: none)."""
        if not self._grace_until:
            return 0
        return max(0, int((self._grace_until - time.monotonic()) * 1000))
