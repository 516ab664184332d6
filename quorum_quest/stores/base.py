"""The store protocol: the one small interface every lock backend implements.

A store owns the lock state. Each of `acquire`, `keep_alive` and `release` must be
ONE atomic backend operation, so that two service instances sharing a backend can
never both grant the same lock. `keep_alive_many` renews each lock of a batch as
`keep_alive` would, each renewal atomic on its own; a backend that can renew a batch
in one round trip overrides it. Stores raise `StoreUnavailable` when the backend
cannot answer; they never turn a failure into "held by someone else".

State loss. When a store finds that the lock state it relies on was lost (the
embedded store's process started; Redis restarted without its data or failed over
to a replica; a table was recreated), a lock could be granted again while its last
holder still believes it leads. So the store starts a *grace period* of `grace_ms`
(at least the longest lease the service grants) during which it refuses every new
grant, refresh and renewal, and answers `acquire` with `Acquisition(grace=True)`.
Where several service instances share a backend the grace period is recorded in
the backend, so all of them refuse alike. With `grace_ms == 0` the loss is still
detected and logged, but nothing is refused. `GracePeriod` keeps a store's account
of it.

The leadership watch (`quorum_quest.server.watch`) reads stores through three more
methods: a store that can tell every grant and release, through any service instance,
sets `tells_changes` and implements `follow`; the others are polled with `get_leaders`.
`leaders` lists a service's held locks, where the backend can (a watch of a whole service
needs it). None of them changes lock state.
"""

from __future__ import annotations

import asyncio
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

MAX_NAME_BYTES = 256
# How many `keep_alive` calls the default `keep_alive_many` has in flight at once.
KEEP_ALIVE_MANY_CONCURRENCY = 32


@dataclass(frozen=True, slots=True)
class LockKey:
    """A lock's name: the pair (service, domain). Two pairs are always two locks."""

    service: str
    domain: str


@dataclass(frozen=True, slots=True)
class Acquisition:
    """The answer to `acquire`.

    When `acquired`, `token` is the caller's fencing token and `ttl_ms` its lease;
    `refreshed` tells that the caller already held the lock (same token). Otherwise
    `holder` is the current holder ("" if unknown), `token` its token (0 if unknown)
    and `ttl_ms` what is left of its lease. `grace` tells that the store refused
    because it is in its state-loss grace period; `ttl_ms` is then what is left of it.
    """

    acquired: bool
    holder: str
    token: int
    ttl_ms: int
    refreshed: bool = False
    grace: bool = False

    @classmethod
    def grace_refusal(cls, left_ms: int) -> Acquisition:
        """The refusal while the grace period lasts, `left_ms` more."""
        return cls(False, "", 0, left_ms, grace=True)


@dataclass(frozen=True, slots=True)
class Renewal:
    """The answer to `keep_alive`: `renewed` is False when the caller does not hold the lock."""

    renewed: bool
    token: int = 0


@dataclass(frozen=True, slots=True)
class Holder:
    """The live holder of a lock, as `get_leader` sees it."""

    client_id: str
    token: int
    remaining_ms: int


@dataclass(frozen=True, slots=True)
class LockChange:
    """A grant or a release, as a store that tells changes (`LockStore.follow`) reports it.

    A grant names the new holder, its fencing token and lease (`ttl_ms`); a release has
    `holder == ""` and the token of the lease it ended. A renewal is no change.
    """

    key: LockKey
    holder: str
    token: int
    ttl_ms: int = 0


class GracePeriod:
    """A store's state-loss grace period, known without a round trip.

    Its end is kept on the monotonic clock. A store that records the grace period in a
    state marker (`grace_until`, wall-clock ms) `learn`s it from every marker check, runs
    those checks through `check` so that concurrent callers share one, and reports the
    loss it found itself through `lost`; `marker` (where the marker is) and `loss` (what
    its absence means) word those logs, which are logged as the store's own lines.
    """

    def __init__(
        self, backend: str, *, marker: str = "", loss: str = "", margin_ms: int = 0
    ) -> None:
        self._backend = backend
        self._marker = marker
        self._loss = loss
        self._margin_ms = margin_ms
        self._recorded = 0  # the grace_until this store recorded itself, on its own clock
        self._until = 0  # wall-clock ms, as the marker last showed it
        self._ends = 0.0  # the same end, time.monotonic() seconds
        self._checking: asyncio.Future[int] | None = None

    def left_ms(self, now: float | None = None) -> int:
        """The ms left at `now` (a `time.monotonic()` reading; default: this moment)."""
        if now is None:
            now = time.monotonic()
        return max(0, math.ceil((self._ends - now) * 1000))

    def begin(self, grace_ms: int) -> None:
        """Refuse for `grace_ms` from now."""
        self._ends = time.monotonic() + grace_ms / 1000

    async def check(self, check_marker: Callable[[], Awaitable[int]]) -> int:
        """`check_marker()`, its answer shared with every caller that comes while it runs;
        a caller that leaves (cancelled) does not cancel it for the others."""
        if self._checking is None:
            self._checking = asyncio.ensure_future(check_marker())
            self._checking.add_done_callback(self._checked)
        return await asyncio.shield(self._checking)

    def _checked(self, check: asyncio.Future[int]) -> None:
        self._checking = None
        if not check.cancelled():
            check.exception()  # retrieved: a check whose callers all left logs nothing

    def lost(self, grace_until: int, grace_ms: int) -> int:
        """This store found the loss and recorded a grace period of `grace_ms` until
        `grace_until`: log the loss (only the finder does) and learn it; the ms left."""
        self._recorded = grace_until
        self._until = grace_until
        refused = (
            f"refusing grants, refreshes and keep-alives for {grace_ms} ms"
            if grace_ms
            else "the grace period is off (0 ms): nothing is refused"
        )
        logger.opt(depth=1).warning(
            "{}: lock state lost: {}; {}", self._backend, self._loss, refused
        )
        return self.learn(grace_until)

    def learn_marker(self, grace_until: int, created_at: int) -> int:
        """`learn` a marker recording `grace_until` on the wall clock of the instance that
        found the loss at `created_at`. Where this clock runs ahead of the finder's, the
        grace period would end early by the skew, so it lasts `margin_ms` longer here, as a
        foreign lease does; not on the finder itself (its own clock), nor for a marker that
        records no grace period (`stateLossGrace: 0`)."""
        if grace_until > created_at and grace_until != self._recorded:
            grace_until += self._margin_ms
        return self.learn(grace_until)

    def learn(self, grace_until: int) -> int:
        """Take the marker's grace period (the store's truth) as this store's; the ms left."""
        left = max(0, grace_until - time.time_ns() // 1_000_000)
        if left and grace_until != self._until:
            logger.opt(depth=1).info(
                "{}: the state marker in {} records a grace period after a loss of lock state: "
                "refusing grants, refreshes and keep-alives for {} ms",
                self._backend,
                self._marker,
                left,
            )
        self._until = grace_until
        self._ends = time.monotonic() + left / 1000
        return left


class StoreSettings(BaseModel):
    """Settings common to every store: the `store:` section of the config file.

    Each backend subclasses this with its own keys; unknown keys are rejected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    ttl: int = Field(default=15, gt=0, description="default lease length in seconds")


class LockStore(ABC):
    """A lock backend. Created with its settings, then `start()`ed once before use."""

    #: Registry name, used in logs, metrics and error messages.
    backend: ClassVar[str]
    #: The model that validates this backend's `store:` section.
    settings_model: ClassVar[type[StoreSettings]] = StoreSettings
    #: Keys of the `store:` section that a running store takes on in place (see
    #: `reconfigure`): none of them names or reaches the backend's state.
    policy_keys: ClassVar[frozenset[str]] = frozenset({"ttl"})

    def __init__(self, settings: StoreSettings, *, grace_ms: int = 0) -> None:
        self.settings = settings
        #: How long new grants are refused after a detected loss of the lock state.
        #: The service may change it on a reload; it applies from the next detection.
        self.grace_ms = grace_ms
        #: Called with a lock some caller here waits on (`expect_release`) when it is
        #: released through any service instance; set with `notify_releases`.
        self.released: Callable[[LockKey], None] | None = None

    def reconfigure(self, settings: StoreSettings) -> bool:
        """Take on `settings` in place if they differ from the running ones in
        `policy_keys` only, and return True; otherwise change nothing and return False
        (the service then builds a new store, whose state may be another)."""
        if type(settings) is not type(self.settings):
            return False
        keep = set(self.policy_keys)
        if settings.model_dump(exclude=keep) != self.settings.model_dump(exclude=keep):
            return False
        self.settings = settings
        return True

    def notify_releases(self, released: Callable[[LockKey], None]) -> None:
        """Before `start()`: have `released(key)` called for the locks `expect_release`
        names when they are released, through this service instance or another. A store
        that cannot tell (the default) never calls it: a waiter then asks again when the
        holder's lease is due to end."""
        self.released = released

    async def expect_release(self, key: LockKey, wait_ms: int) -> None:  # noqa: B027
        """A caller here waits up to `wait_ms` for `key` to be released (see
        `notify_releases`); raise `StoreUnavailable` if the backend cannot be told."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect and prepare the backend; raise `StoreUnavailable` if it cannot be reached."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. The store is not used afterwards."""

    @abstractmethod
    async def ping(self) -> None:
        """Return when the backend answers; raise `StoreUnavailable` otherwise."""

    @abstractmethod
    async def check_state(self) -> int:
        """Detect a loss of the lock state; return the ms left of the grace period (0: none).

        Called by `start()` and then periodically by the service, so a loss is found
        even when no lock is asked for. A loss found here or inside an operation is
        logged once, at WARNING, by the store that found it.
        """

    @abstractmethod
    async def acquire(self, key: LockKey, client_id: str, ttl_ms: int) -> Acquisition:
        """Grant a free or expired lock with a new, larger token; refresh the caller's own lease."""

    @abstractmethod
    async def keep_alive(self, key: LockKey, client_id: str, ttl_ms: int) -> Renewal:
        """Extend the caller's live lease to `ttl_ms`; never revive an expired or released one."""

    async def keep_alive_many(
        self, keys: Sequence[LockKey], client_id: str, ttl_ms: int
    ) -> list[Renewal]:
        """`keep_alive` for each of `keys`, answered in the same order.

        Each lock is renewed on its own (never revived, never renewed for another
        holder); the batch is not atomic as a whole. Raises `StoreUnavailable` when any
        renewal could not be made: renewing again is always safe. This default runs
        `keep_alive` concurrently, at most `KEEP_ALIVE_MANY_CONCURRENCY` at a time.
        """
        renewals: list[Renewal] = [Renewal(False)] * len(keys)
        pending = iter(enumerate(keys))

        async def renew_next() -> None:
            for index, key in pending:
                renewals[index] = await self.keep_alive(key, client_id, ttl_ms)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(KEEP_ALIVE_MANY_CONCURRENCY, len(keys))):
                    group.create_task(renew_next())
        except ExceptionGroup as failures:
            # The first failure stands for the batch, as one failed call would.
            raise failures.exceptions[0] from None
        return renewals

    @abstractmethod
    async def release(self, key: LockKey, client_id: str, token: int = 0) -> bool:
        """Delete the caller's lease (only the one with fencing token `token`, when > 0);
        True if this call deleted it."""

    @abstractmethod
    async def get_leader(self, key: LockKey) -> Holder | None:
        """The live holder of the lock, or None when it is free."""

    # -- what the leadership watch reads (quorum_quest.server.watch) ---------------------

    #: Whether `follow` tells of every grant and release, through any service instance
    #: sharing the backend. The watch polls a store that does not, every
    #: `server.watchInterval` seconds.
    tells_changes: ClassVar[bool] = False

    async def follow(
        self, changed: Callable[[LockChange], None], synced: Callable[[], None]
    ) -> None:
        """Until cancelled: call `changed` with every grant and release of any lock.

        `synced()` is called once the store listens, and again after a lapse in which
        changes may have been missed (a lost connection): the reader then reads what it
        follows afresh. Expiry is not told: the reader reads the lock again at its lease
        end. Only a store with `tells_changes` implements it.
        """
        raise NotImplementedError(f"the {self.backend} store does not tell changes")

    async def get_leaders(self, keys: Sequence[LockKey]) -> list[Holder | None]:
        """`get_leader` of each of `keys`, in the same order. This default runs them
        concurrently, at most `KEEP_ALIVE_MANY_CONCURRENCY` at a time."""
        holders: list[Holder | None] = [None] * len(keys)
        pending = iter(enumerate(keys))

        async def read_next() -> None:
            for index, key in pending:
                holders[index] = await self.get_leader(key)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(KEEP_ALIVE_MANY_CONCURRENCY, len(keys))):
                    group.create_task(read_next())
        except ExceptionGroup as failures:
            raise failures.exceptions[0] from None
        return holders

    async def leaders(self, service: str) -> dict[LockKey, Holder]:
        """The live holder of every held lock of `service` (every domain).

        A store that cannot list a service's locks (the default) raises
        `NotImplementedError`: watching a whole service is then refused.
        """
        raise NotImplementedError(f"the {self.backend} store cannot list the locks of a service")
