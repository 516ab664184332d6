"""What every call reads: one snapshot of settings, lease policy, store and telemetry.

A reload builds a new `Snapshot` and swaps it in whole; a call that started on the
old one finishes on it, so no call ever mixes two configurations. The old store
is closed once the calls still using it have finished.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quorum_quest.config.settings import Settings
from quorum_quest.server.quotas import Quotas
from quorum_quest.server.session import Sessions
from quorum_quest.server.watch import WatchHub
from quorum_quest.stores import LockKey, LockStore, store_class
from quorum_quest.telemetry.telemetry import Telemetry

if TYPE_CHECKING:
    from quorum_quest.server.access import Access


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
    """One configuration in force: read once at the start of every call.

    `access` is None while auth is off (`Settings.auth_on`)."""

    settings: Settings
    store: LockStore
    telemetry: Telemetry
    access: Access | None = None
    policy: LeasePolicy = field(init=False)
    in_flight: int = field(default=0, init=False)
    _drained: asyncio.Event | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.policy = LeasePolicy.from_settings(self.settings)
        self.telemetry.expect_backend(self.store.backend)

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
    """Leases granted or renewed through this instance that have not ended, by lock.

    Each entry names its holder, so a call by anyone else (a keep-alive or release
    refused to a non-holder) never ends the holder's entry.
    """

    def __init__(self) -> None:
        self._leases: dict[LockKey, tuple[str, float]] = {}  # holder, time.monotonic() end
        self._prune_above = 1024

    def granted(self, key: LockKey, holder: str, ttl_ms: int) -> None:
        self._leases[key] = (holder, time.monotonic() + ttl_ms / 1000)
        if len(self._leases) > self._prune_above:
            self._prune()
            self._prune_above = max(1024, 2 * len(self._leases))

    def ended(self, key: LockKey, holder: str) -> bool:
        """Forget `holder`'s lease of `key`; True if this instance knew it as live."""
        entry = self._leases.get(key)
        if entry is None or entry[0] != holder:
            return False
        del self._leases[key]
        return entry[1] > time.monotonic()

    def _prune(self) -> None:
        now = time.monotonic()
        self._leases = {k: entry for k, entry in self._leases.items() if entry[1] > now}

    def __len__(self) -> int:
        self._prune()
        return len(self._leases)


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

    def wake_all(self) -> None:
        """Wake every waiter, to ask again (the store they waited on was swapped out)."""
        for event, _ in self._waiting.values():
            event.set()
        self._waiting.clear()

    def close(self) -> None:
        """Wake every waiter and wait no more: the instance is shutting down."""
        self._closed = True
        for event, _ in self._waiting.values():
            event.set()
        self._waiting.clear()


class Runtime:
    """The snapshot in force, plus what outlives any one snapshot.

    It also remembers the longest lease a client may still believe in, across reloads:
    lowering `server.maxTtl` shortens new leases and renewals at once, but a lease
    granted under the old maximum may last that long after the reload. That bound sets
    the state-loss grace period when it is `auto`, and the *handover* after a store
    swap: for that long this instance grants nothing from the new store, since a client
    may still believe in a lease the old store granted.
    """

    def __init__(self, current: Snapshot, leases: LeaseBook, started: float) -> None:
        self.current = current
        self.leases = leases
        self.releases = Releases()
        self.watches = WatchHub(self)  # every WatchLeaders stream of this instance
        self.sessions = Sessions()  # every Session stream of this instance
        self.started = started
        self.reloads: Counter[str] = Counter()
        self.quotas = Quotas()  # counted per identity, whatever the configuration
        self.last_reload = ""
        self.store_reachable = True
        self._grace_until = 0.0  # time.monotonic() seconds
        self._handover_until = 0.0  # time.monotonic() seconds
        # (until, ms): leases granted before a reload lowered maxTtl last up to ms, until.
        self._old_bounds: list[tuple[float, int]] = []

    def note_grace(self, left_ms: int) -> None:
        """Record what the store says is left of its state-loss grace period."""
        self._grace_until = time.monotonic() + left_ms / 1000 if left_ms > 0 else 0.0

    def grace_left_ms(self) -> int:
        """ms left of the store's grace period or of a store swap's handover (0: none)."""
        return max(_left_ms(self._grace_until), self.handover_left_ms())

    def longest_lease_ms(self) -> int:
        """The longest lease, granted or renewed here, that a client may still believe in."""
        now = time.monotonic()
        self._old_bounds = [(until, ms) for until, ms in self._old_bounds if until > now]
        return max([self.current.policy.max_ttl_ms, *(ms for _, ms in self._old_bounds)])

    def state_loss_grace_ms(self) -> int:
        """The grace period stores start on a loss of state: `server.stateLossGrace`, or
        when it is `auto` the longest lease that may still be believed in."""
        server = self.current.settings.server
        if server.stateLossGrace is not None:
            return int(server.stateLossGrace * 1000)
        return self.longest_lease_ms()

    def swap(self, new: Snapshot) -> None:
        """Put `new` in force. Leases granted up to now may outlive a lower maxTtl by as
        long as the longest of them; a new store hands over (grants nothing) for as long,
        unless the grace period is off. Waiters on a swapped-out store are woken to ask
        again; they then ask the new store."""
        old = self.current
        longest = self.longest_lease_ms()
        if new.policy.max_ttl_ms < longest:
            self._old_bounds.append((time.monotonic() + longest / 1000, longest))
        self.current = new
        if new.store is not old.store:
            if new.settings.server.state_loss_grace > 0:
                self._handover_until = time.monotonic() + longest / 1000
            self.releases.wake_all()

    def handover_left_ms(self) -> int:
        """ms left of the handover after a store swap (0: none)."""
        return _left_ms(self._handover_until)


def _left_ms(until: float) -> int:
    if not until:
        return 0
    return max(0, math.ceil((until - time.monotonic()) * 1000))
