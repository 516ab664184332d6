"""The leadership watch: one hub per service instance feeding every WatchLeaders stream.

What it guarantees:

- a stream is first told the state of each lock it watches (`CURRENT`; for a whole
  service, each lock held then), then each change of them: `GRANTED`, `RELEASED`,
  `EXPIRED`, `LOST` (the store lost its state, or a reload replaced it). Per lock the
  changes come in order and a grant's fencing token is larger than every one told before;
- a renewal is no change; expiry that nobody announces is found by reading the lock
  at its lease end (stores that tell changes: memory, Redis), or at the next poll
  (`server.watchInterval`, ScyllaDB and DynamoDB), so it is told within that bound plus
  one store read;
- a stream whose reader falls behind holds at most one unsent state per lock: a newer
  state replaces the unsent one and carries `gap`, so memory stays bounded by the
  locks watched, never by the rate of changes;
- the store is read once per change for the whole instance, whatever the number of
  streams: the hub keeps one known state per followed lock and one feed (the store's
  change notifications, or one poll loop), started with the first stream and stopped
  with the last, so an instance nobody watches does no work for it;
- on `close()` (shutdown) every stream ends at once; the servicer answers UNAVAILABLE
  so that clients resume elsewhere, passing the tokens they saw last.

Everything here runs on the event loop: the state is changed only by synchronous
methods, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from loguru import logger

from quorum_quest.errors import StoreUnavailable
from quorum_quest.stores import Holder, LockChange, LockKey, LockStore

if TYPE_CHECKING:
    from quorum_quest.server.runtime import Runtime

CURRENT, GRANTED, RELEASED, EXPIRED, LOST = "current", "granted", "released", "expired", "lost"
# A lock is read again this long after its lease is due to end, so that the store
# (Redis expires keys on its own clock) has let it go by then.
EXPIRY_SLACK_S = 0.005
# Seconds the feed waits before trying a store again after it failed.
RETRY_S = 1.0
# Locks read in one go when several are due (expiries, a resync).
READ_BATCH = 1_000
# How long a new stream waits for the feed to listen before it answers UNAVAILABLE.
LISTEN_TIMEOUT_S = 10.0


class WatchClosed(Exception):
    """The hub was closed (the instance shuts down): the stream ends."""


@dataclass(frozen=True, slots=True)
class Change:
    """What a stream is told of one lock: its state after the change, and the change."""

    key: LockKey
    kind: str
    holder: str  # "" when free
    token: int  # 0 when free
    ends: float  # time.monotonic() at the end of the holder's lease; 0 when free
    gap: bool = False

    def remaining_ms(self) -> int:
        return max(0, int((self.ends - time.monotonic()) * 1000)) if self.holder else 0


@dataclass(slots=True)
class _Known:
    """The hub's view of one lock. A free lock keeps the last token it knew; `version`
    counts the changes the store told, so that a read that overlapped one is dropped."""

    holder: str = ""
    token: int = 0
    ends: float = 0.0
    version: int = 0


class Watch:
    """One stream's subscription: which locks, and the states not sent yet."""

    def __init__(
        self,
        keys: Iterable[LockKey],
        service: str | None,
        allowed: Callable[[LockKey], bool],
    ) -> None:
        self.keys = frozenset(keys)
        self.service = service
        self._allowed = allowed
        self._pending: dict[LockKey, Change] = {}
        self._ready = asyncio.Event()
        self._closed = False
        self.muted = True  # until the hub has given it the current state

    def offer(self, change: Change) -> None:
        """Queue `change`; an unsent state of the same lock is replaced, with `gap`."""
        if self.muted or not self._allowed(change.key):
            return
        if change.key in self._pending:
            change = replace(change, gap=True)
        self._pending[change.key] = change
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def changes(self) -> AsyncIterator[Change]:
        """The changes as they come; raises `WatchClosed` when the hub closes."""
        while True:
            if self._closed:
                raise WatchClosed
            if not self._pending:
                self._ready.clear()
                await self._ready.wait()
                continue
            # The whole batch at once: a lock changed again while the batch is sent
            # waits in the next one (so at most two states per lock are ever held).
            batch, self._pending = self._pending, {}
            for change in batch.values():
                if self._closed:
                    raise WatchClosed
                yield change


class WatchHub:
    """Follows the locks every open `Watch` wants, on the runtime's current store."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._by_key: dict[LockKey, set[Watch]] = {}
        self._by_service: dict[str, set[Watch]] = {}
        self._known: dict[LockKey, _Known] = {}
        self._timers: dict[LockKey, asyncio.TimerHandle] = {}
        self._due: set[LockKey] = set()
        self._resync = False
        self._wake_reader = asyncio.Event()
        self._feed: asyncio.Task[None] | None = None
        self._live = asyncio.Event()  # the feed listens: changes from now on are heard
        self._store: LockStore | None = None  # the store the feed follows
        self._closed = False

    # -- streams -------------------------------------------------------------------

    async def open(
        self,
        keys: Iterable[LockKey],
        service: str | None,
        resume: Mapping[LockKey, int],
        allowed: Callable[[LockKey], bool],
    ) -> Watch:
        """A new watch, already given the current state of what it watches, compared
        with `resume` (the tokens its client saw last).

        Raises `WatchClosed` when the hub is closed, `StoreUnavailable` when the state
        cannot be read, `NotImplementedError` for a service on a store that cannot list
        a service's locks.
        """
        if self._closed:
            raise WatchClosed
        watch = Watch(keys, service, allowed)
        for key in watch.keys:
            self._by_key.setdefault(key, set()).add(watch)
        if service is not None:
            self._by_service.setdefault(service, set()).add(watch)
        try:
            self._start_feed()
            try:
                async with asyncio.timeout(LISTEN_TIMEOUT_S):
                    await self._live.wait()
            except TimeoutError:
                backend = self._runtime.current.store.backend
                raise StoreUnavailable(backend, "cannot follow the store's changes") from None
            store = self._store or self._runtime.current.store
            for key in watch.keys:
                self._known.setdefault(key, _Known())
            await self._read(
                store,
                list(watch.keys),
                {service} if service is not None else set(),
                gap=False,
                listing_required=True,
            )
            if self._closed:
                raise WatchClosed
            self._begin(watch, resume)
        except BaseException:
            self.leave(watch)
            raise
        return watch

    def _begin(self, watch: Watch, resume: Mapping[LockKey, int]) -> None:
        """Give `watch` the state of each lock it follows, and unmute it."""
        service = watch.service
        followed = set(watch.keys)
        if service is not None:
            followed |= {key for key, known in self._known.items() if key.service == service}
            followed |= {key for key in resume if key.service == service}
        watch.muted = False
        for key in followed:
            known = self._known.get(key) or _Known()
            seen = resume.get(key)
            held = known.token if known.holder else 0
            if key not in watch.keys and not held and not seen:
                continue  # a free lock of the service that the client never saw held
            gap = seen is not None and seen != held
            kind = GRANTED if gap and held > (seen or 0) else CURRENT
            watch.offer(Change(key, kind, known.holder, held, known.ends, gap))

    def leave(self, watch: Watch) -> None:
        """Forget `watch` (its stream ended), and what only it followed."""
        watch.close()
        for key in watch.keys:
            watches = self._by_key.get(key)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._by_key[key]
        if watch.service is not None:
            watches = self._by_service.get(watch.service)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._by_service[watch.service]
        if not self._by_key and not self._by_service:
            self._stop_feed()
            for key in list(self._known):
                self._forget(key)
            return
        gone = watch.keys if watch.service is None else list(self._known)
        for key in [key for key in gone if not self._followed(key)]:
            self._forget(key)

    async def close(self) -> None:
        """End every watch (the instance shuts down) and stop following the store."""
        self._closed = True
        for watches in [*self._by_key.values(), *self._by_service.values()]:
            for watch in watches:
                watch.close()
        feed = self._feed
        self._stop_feed()
        if feed is not None:
            await asyncio.gather(feed, return_exceptions=True)

    # -- the state of each lock -------------------------------------------------------

    def _followed(self, key: LockKey) -> bool:
        return key in self._by_key or key.service in self._by_service

    def _forget(self, key: LockKey) -> None:
        self._known.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._due.discard(key)

    def _tell(self, change: Change) -> None:
        for watch in self._by_key.get(change.key, ()):
            watch.offer(change)
        for watch in self._by_service.get(change.key.service, ()):
            if change.key not in watch.keys:
                watch.offer(change)

    def _grant(self, key: LockKey, holder: str, token: int, ends: float, gap: bool) -> None:
        known = self._known.setdefault(key, _Known())
        if known.holder and token == known.token:
            known.ends = ends  # a renewal: no change
            self._expire_at(key, ends)
            return
        if token <= known.token:
            return  # older than what is known: a notification or a read that came late
        if known.holder:
            if known.ends <= time.monotonic() + EXPIRY_SLACK_S:
                self._end(key, EXPIRED)  # its lease was due to end: it did, unread
            else:
                gap = True  # a lease replaced before its end was seen: that end was missed
        known.holder, known.token, known.ends = holder, token, ends
        self._tell(Change(key, GRANTED, holder, token, ends, gap))
        self._expire_at(key, ends)

    def _end(self, key: LockKey, kind: str, token: int = 0, gap: bool = False) -> None:
        """The lease with `token` (0: whatever lease is known) ended by `kind`."""
        known = self._known.get(key)
        if known is None or not known.holder or (token and token != known.token):
            return
        known.holder, known.ends = "", 0.0
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._tell(Change(key, kind, "", 0, 0.0, gap))

    def _changed(self, change: LockChange) -> None:
        """A grant or release the store told of (any lock; most are not followed)."""
        key = change.key
        if not self._followed(key) or self._grace():
            return
        known = self._known.setdefault(key, _Known())
        known.version += 1
        if change.holder:
            ends = time.monotonic() + change.ttl_ms / 1000
            self._grant(key, change.holder, change.token, ends, False)
        else:
            self._end(key, RELEASED, change.token)

    def _expire_at(self, key: LockKey, ends: float) -> None:
        """Read `key` again once its lease is due to end (no store tells expiry)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if self._store is None or not self._store.tells_changes:
            return  # the poll reads it anyway
        delay = max(0.0, ends - time.monotonic()) + EXPIRY_SLACK_S
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._read_later, key)

    def _read_later(self, key: LockKey) -> None:
        self._timers.pop(key, None)
        self._due.add(key)
        self._wake_reader.set()

    def _grace(self) -> bool:
        """While the store's state-loss grace period (or a reload's handover) lasts, no
        holder can be trusted: every held lock is LOST, and nothing is read."""
        if not self._runtime.grace_left_ms():
            return False
        for key, known in self._known.items():
            if known.holder:
                self._end(key, LOST)
        return True

    # -- reading the store ------------------------------------------------------------

    async def _read(
        self,
        store: LockStore,
        keys: list[LockKey],
        services: set[str],
        *,
        gap: bool,
        listing_required: bool = False,
    ) -> None:
        """Read `keys` and every lock of `services`, and tell what changed. A lock the
        store told a change of while the read ran keeps what it was told."""
        if self._grace():
            return
        for service in services:
            before = {
                key: known.version for key, known in self._known.items() if key.service == service
            }
            try:
                held = await store.leaders(service)
            except NotImplementedError:
                if listing_required:
                    raise
                continue
            self._found(before, held, gap)
        keys = [key for key in keys if key.service not in services]
        for start in range(0, len(keys), READ_BATCH):
            batch = keys[start : start + READ_BATCH]
            before = {key: known.version for key in batch if (known := self._known.get(key))}
            holders = await store.get_leaders(batch)
            self._found(
                before,
                {key: holder for key, holder in zip(batch, holders, strict=True) if holder},
                gap,
            )

    def _found(self, before: dict[LockKey, int], held: dict[LockKey, Holder], gap: bool) -> None:
        """A read found `held` held and the rest of `before` (each lock's version when
        the read began) free."""
        now = time.monotonic()
        for key in before.keys() | held.keys():
            known = self._known.get(key)
            if key in before and (known is None or known.version != before[key]):
                continue  # told of a change meanwhile: that is newer than this read
            if not self._followed(key):
                continue
            holder = held.get(key)
            if holder is not None:
                ends = now + holder.remaining_ms / 1000
                self._grant(key, holder.client_id, holder.token, ends, gap)
            elif known is not None and known.holder:
                # Free before its lease was due to end: a release nobody told.
                kind = EXPIRED if known.ends <= now + EXPIRY_SLACK_S else RELEASED
                self._end(key, kind, gap=gap or kind == RELEASED and store_tells(self._store))

    # -- the feed ---------------------------------------------------------------------

    def _start_feed(self) -> None:
        if self._feed is None or self._feed.done():
            self._live.clear()
            self._feed = asyncio.get_running_loop().create_task(self._follow())

    def _stop_feed(self) -> None:
        if self._feed is not None:
            self._feed.cancel()
            self._feed = None
        self._live.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._due.clear()
        self._store = None

    async def _follow(self) -> None:
        """Follow the store in force, and the next one after a reload, until cancelled."""
        while True:
            store = self._runtime.current.store
            if self._store is not None and store is not self._store:
                # The leases of the replaced store are not carried over.
                for key, known in self._known.items():
                    if known.holder:
                        self._end(key, LOST)
                    known.token = 0
            self._store = store
            try:
                async with asyncio.TaskGroup() as group:
                    if store.tells_changes:
                        group.create_task(store.follow(self._changed, self._synced))
                        group.create_task(self._read_due(store))
                    else:
                        self._live.set()
                    await self._tick(store)
                    raise _Swapped
            except* _Swapped:
                pass
            except* StoreUnavailable as failures:
                logger.warning(
                    "watch: following the {} store failed, again in {:g} s: {}",
                    store.backend,
                    RETRY_S,
                    failures.exceptions[0],
                )
                await asyncio.sleep(RETRY_S)
            except* Exception as failures:
                logger.opt(exception=failures.exceptions[0]).error(
                    "watch: following the {} store failed, again in {:g} s",
                    store.backend,
                    RETRY_S,
                )
                await asyncio.sleep(RETRY_S)

    def _synced(self) -> None:
        """The store listens (again): what was followed is read afresh."""
        if self._live.is_set():
            self._resync = True
            self._wake_reader.set()
        self._live.set()

    async def _tick(self, store: LockStore) -> None:
        """Every `server.watchInterval` s: notice a reload's new store and a grace period;
        on a store that tells no changes, read every followed lock. Returns when the
        store in force is another."""
        in_grace = False
        while True:
            if self._runtime.current.store is not store:
                return
            if self._grace():
                in_grace = True
            elif in_grace or not store.tells_changes:
                await self._read(store, list(self._known), set(self._by_service), gap=in_grace)
                in_grace = False
            await asyncio.sleep(self._runtime.current.settings.server.watchInterval)

    async def _read_due(self, store: LockStore) -> None:
        """Read the locks that are due (a lease end), or all after a resync."""
        while True:
            await self._wake_reader.wait()
            self._wake_reader.clear()
            if self._resync:
                self._resync = False
                self._due.clear()
                # A lost subscription may be a Redis that restarted without its data:
                # a state loss found now is reported LOST, not as releases.
                self._runtime.note_grace(await store.check_state())
                # Notifications were lost: whole changes may have been missed.
                await self._read(store, list(self._known), set(self._by_service), gap=True)
                continue
            due, self._due = self._due, set()
            await self._read(store, [key for key in due if key in self._known], set(), gap=False)


class _Swapped(Exception):
    """The store in force changed: follow the new one."""


def store_tells(store: LockStore | None) -> bool:
    return store is not None and store.tells_changes
