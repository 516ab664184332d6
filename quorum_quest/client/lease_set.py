"""The leases one client holds on a set of locks together: `LeaseSet`, made by
`client.leaderships()`.

What a set guarantees, for each of its leases on its own whatever the others do: the
lease is valid only until the send time of its last successful acquire or renewal +
ttl - safety margin (on this process's monotonic clock); when it is lost it ends
(`lease.wait_ended()`, `on_leader_lost`) and leaves the set, and the others carry on;
every lease still held is released when the set closes, a failure to do so logged.

The set only decides which locks it holds and renews nothing itself: its leases are
kept alive by one `LeaseKeeper` (`quorum_quest.client.lease`, the SDK's one keep-alive
loop).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus

from quorum_quest.client.lease import EXPIRED, RELEASED, Lease, LeaseKeeper
from quorum_quest.client.status import BEST_EFFORT_FAILURES
from quorum_quest.errors import QuotaExceeded, ServiceUnavailable

if TYPE_CHECKING:
    from quorum_quest.client.client import QuorumQuestClient
    from quorum_quest.client.leadership import Callbacks, LeaseCallback

logger = logging.getLogger("quorum_quest.client")

# A lock named for `leaderships()`: a domain of the client's service, or (service, domain).
LockName = str | tuple[str, str]

# Renewals of a LeaseSet: locks per KeepAliveMany call, calls in flight, and how close
# together two leases' renewals must fall to share a call.
RENEW_BATCH = 1_000
RENEW_CONCURRENCY = 4
RENEW_COALESCE_S = 0.5
# TryAcquireLock / ReleaseLock calls a LeaseSet has in flight at once.
SET_CALL_CONCURRENCY = 64


def _lock_name(service: str, name: LockName) -> tuple[str, str]:
    return (service, name) if isinstance(name, str) else (name[0], name[1])


class LeaseSet:
    """The leases one client holds on a set of locks, made by `client.leaderships()`.

    Iterating gives the leases held now; `get(lock)` one of them or None. Every
    lease is renewed by one `LeaseKeeper` (batched `KeepAliveMany` calls), so one
    client object can lead thousands of locks with a handful of calls per interval.
    """

    def __init__(
        self,
        client: QuorumQuestClient,
        locks: Iterable[LockName],
        callbacks: Callbacks,
        group: TaskGroup,
    ) -> None:
        self._client = client
        self._locks = list(dict.fromkeys(_lock_name(client.service, lock) for lock in locks))
        self._callbacks = callbacks
        self._group = group
        self._held: dict[tuple[str, str], Lease] = {}
        self._keeper = LeaseKeeper(
            client._renew_many,
            interval=client.keep_alive_interval,
            margin=client.safety_margin,
            rpc_timeout=client.rpc_timeout,
            batch_size=RENEW_BATCH,
            concurrency=RENEW_CONCURRENCY,
            coalesce=min(RENEW_COALESCE_S, client.keep_alive_interval / 10),
            on_lost=self._lost,
        )
        self._keeping: anyio.CancelScope | None = None
        self._unreported: list[Lease] = []  # lost, not logged yet

    @property
    def locks(self) -> list[tuple[str, str]]:
        """Every lock of the set, held or not, as (service, domain)."""
        return list(self._locks)

    def __iter__(self) -> Iterator[Lease]:
        return (lease for lease in list(self._held.values()) if lease.is_valid)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, lock: LockName) -> Lease | None:
        """The valid lease on `lock` (a domain of the client's service, or a pair), or None."""
        lease = self._held.get(_lock_name(self._client.service, lock))
        return lease if lease is not None and lease.is_valid else None

    async def try_acquire(self) -> list[Lease]:
        """Try once to acquire every lock of the set not held now; the leases it got.

        Locks held by someone else are skipped. A lock the service could not answer
        for, or refused for a quota, is logged and left for the next try;
        `InvalidArgument`, `Unauthenticated` and `PermissionDenied` are raised.
        """
        client = self._client
        missing = [lock for lock in self._locks if self.get(lock) is None]
        granted: list[Lease] = []
        failed: list[tuple[tuple[str, str], ServiceUnavailable | QuotaExceeded]] = []
        calls = anyio.CapacityLimiter(SET_CALL_CONCURRENCY)

        async def acquire(lock: tuple[str, str]) -> None:
            async with calls:
                try:
                    response, sent_at = await client._grant(*lock)
                except (ServiceUnavailable, QuotaExceeded) as exc:
                    failed.append((lock, exc))
                    return
            if response.is_leader:
                stale = self._held.get(lock)
                if stale is not None:  # ran out before the keeper noticed: it ends now
                    self._keeper.discard(stale)
                    self._end(stale, EXPIRED)
                lease = client._new_lease(*lock, response, sent_at)
                self._held[lock] = lease
                self._keeper.add(lease)
                granted.append(lease)
                self._notify(self._callbacks.on_leader_elected, lease)

        try:
            async with anyio.create_task_group() as attempts:
                for lock in missing:
                    attempts.start_soon(acquire, lock)
        except ExceptionGroup as errors:
            raise errors.exceptions[0] from None
        if failed:
            (service, domain), error = failed[0]
            logger.warning(
                "could not try %s of %s locks (e.g. %s/%s): %s",
                len(failed),
                len(missing),
                service,
                domain,
                error,
            )
        return granted

    async def release(self, lock: LockName) -> bool:
        """Stop holding `lock` and release it; True when this call released it."""
        name = _lock_name(self._client.service, lock)
        lease = self._held.pop(name, None)
        if lease is None:
            return False
        self._keeper.discard(lease)
        try:
            return await self._client._release_lease(*name, lease.fencing_token)
        finally:
            self._end(lease, RELEASED)

    def _notify(self, callback: LeaseCallback | None, lease: Lease) -> None:
        if callback is not None:
            self._group.start_soon(self._client._notify, callback, lease)

    def _end(self, lease: Lease, reason: str) -> None:
        lease._end(reason)
        self._notify(self._callbacks.on_leader_lost, lease)

    def _lost(self, lease: Lease) -> None:
        """The keeper lost `lease`: it leaves the set, the others carry on."""
        name = (lease.service, lease.domain)
        if self._held.get(name) is lease:
            del self._held[name]
        if not self._unreported:
            self._group.start_soon(self._report_lost)
        self._unreported.append(lease)
        self._notify(self._callbacks.on_leader_lost, lease)

    async def _report_lost(self) -> None:
        """One log line for the leases lost together (one answer can refuse thousands)."""
        await anyio.sleep(0)  # let the rest of this answer come in first
        lost, self._unreported = self._unreported, []
        first = lost[0]
        logger.warning(
            "lost %s lock(s), e.g. %s/%s: %s",
            len(lost),
            first.service,
            first.domain,
            first.end_reason,
        )

    async def _keep(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.CancelScope() as self._keeping:
            task_status.started()
            await self._keeper.run()

    async def _close(self) -> None:
        """Stop renewing, then release every lease still held."""
        if self._keeping is not None:
            self._keeping.cancel()
        held, self._held = self._held, {}
        for lease in held.values():
            self._keeper.discard(lease)
        calls = anyio.CapacityLimiter(SET_CALL_CONCURRENCY)
        failures: list[Exception] = []

        async def release(lease: Lease) -> None:
            async with calls:
                try:
                    await self._client._release_lease(
                        lease.service, lease.domain, lease.fencing_token
                    )
                except BEST_EFFORT_FAILURES as exc:
                    failures.append(exc)
            self._end(lease, RELEASED)

        async with anyio.create_task_group() as releases:
            for lease in held.values():
                releases.start_soon(release, lease)
        if failures:
            logger.warning(
                "could not release %s of %s locks: %s", len(failures), len(held), failures[0]
            )
