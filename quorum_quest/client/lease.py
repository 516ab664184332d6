"""A lease this client holds, and the one loop that keeps leases alive."""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio

from quorum_quest.errors import AccessRefused, LeadershipLost, QuotaExceeded, ServiceUnavailable

RELEASED = "released by this client"
EXPIRED = "the lease expired before it could be renewed"
REFUSED = "the service says this client no longer holds the lock"


@dataclass(eq=False)
class Lease:
    """The right to act as holder of (service, domain) until `remaining` reaches zero.

    Validity is judged on this process's monotonic clock from the send time of the
    last successful acquire or keep-alive, minus a safety margin, so the client
    stops believing it leads before the service can give the lock to anyone else.
    A process paused longer than the lease (GC, SIGSTOP) can still act on a stale
    belief between two checks: pass `fencing_token` to whatever you protect, and
    have it reject tokens older than the newest it has seen.

    A lease ends once, for good: when its keep-alive loses it or this client
    releases it. An ended lease is never valid again.
    """

    service: str
    domain: str
    client_id: str
    fencing_token: int
    ttl: float  # seconds granted by the service
    _deadline: float = field(repr=False)  # time.monotonic() after which it is not guaranteed
    _end_reason: str | None = field(default=None, repr=False)
    _ended: anyio.Event | None = field(default=None, repr=False)  # made by the first waiter

    @property
    def remaining(self) -> float:
        """Seconds left until this client must stop acting as holder (0 when expired)."""
        if self._end_reason is not None:
            return 0.0
        return max(0.0, self._deadline - time.monotonic())

    @property
    def is_valid(self) -> bool:
        return self._end_reason is None and time.monotonic() < self._deadline

    @property
    def end_reason(self) -> str | None:
        """Why this client stopped holding the lease, or None while it has not ended."""
        return self._end_reason

    def ensure_valid(self) -> None:
        """Raise `LeadershipLost` unless the lease still holds; call it before a side effect."""
        if not self.is_valid:
            why = self._end_reason or "expired"
            raise LeadershipLost(f"lease on {self.service}/{self.domain}: {why}")

    async def wait_ended(self) -> str:
        """Wait until the lease ends (lost or released) and return why."""
        if self._end_reason is None:
            if self._ended is None:
                self._ended = anyio.Event()
            await self._ended.wait()
        assert self._end_reason is not None
        return self._end_reason

    def _renewed(self, sent_at: float, ttl: float, margin: float, token: int) -> None:
        self.ttl = ttl
        self._deadline = sent_at + ttl - margin
        if token:
            self.fencing_token = token

    def _end(self, reason: str) -> None:
        """End the lease for good; the first reason given is the one kept."""
        if self._end_reason is None:
            self._end_reason = reason
            if self._ended is not None:
                self._ended.set()


# `renew(leases, timeout)` asks the service to extend each of `leases` within `timeout`
# seconds and answers per lease, in order, the granted ttl and token, or None when the
# service says this client does not hold that lock. It raises `ServiceUnavailable` when
# it got no usable answer.
RenewMany = Callable[[Sequence[Lease], float], Awaitable[Sequence["tuple[float, int] | None"]]]
# The same for one lease.
Renew = Callable[[float], Awaitable["tuple[float, int] | None"]]

RETRY_FIRST_S = 0.05


@dataclass(eq=False, slots=True)
class _Schedule:
    """Where one lease stands in the keeper: next renewal, retry backoff, call in flight."""

    lease: Lease
    due: float  # time.monotonic() of the next renewal
    backoff: float = RETRY_FIRST_S
    in_flight: bool = False
    version: int = 0  # heap entries of older versions are stale


class LeaseKeeper:
    """Keeps every lease added to it alive until it ends; the SDK's one keep-alive loop.

    For each lease on its own, whatever the others do:

    - a renewal is sent `interval` after the send time of the previous successful one
      (up to `coalesce` earlier, to share a call);
    - the lease is valid until that send time + the granted ttl - `margin`, on this
      process's monotonic clock, and never beyond: an answer that arrives after the
      deadline does not revive it;
    - a failed call is retried with backoff for as long as the lease still holds;
    - it ends (`on_lost` is called) only when the service refuses it or it runs out;
      ending one lease never touches another.

    Leases due within `coalesce` seconds of each other are renewed together, up to
    `batch_size` per call, with at most `concurrency` calls in flight; a renewal that
    waited for a free call is timed from its actual send. Stopped by cancelling `run()`.
    """

    def __init__(
        self,
        renew: RenewMany,
        *,
        interval: float,
        margin: float,
        rpc_timeout: float,
        batch_size: int = 1,
        concurrency: int = 1,
        coalesce: float = 0.0,
        on_lost: Callable[[Lease], None] | None = None,
    ) -> None:
        self._renew = renew
        self._interval = interval
        self._margin = margin
        self._rpc_timeout = rpc_timeout
        self._batch_size = batch_size
        self._calls = anyio.CapacityLimiter(concurrency)
        self._coalesce = coalesce
        self._on_lost = on_lost
        self._schedules: dict[Lease, _Schedule] = {}
        # (wake-up time, tie-break, version, schedule): the next renewal of an idle
        # lease, the deadline of one whose renewal is in flight.
        self._heap: list[tuple[float, int, int, _Schedule]] = []
        self._order = itertools.count()
        self._wakeup: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._schedules)

    def add(self, lease: Lease) -> None:
        """Keep `lease` alive from now on, renewed `interval` after it was granted."""
        granted_at = lease._deadline - lease.ttl + self._margin  # send time of the grant
        schedule = _Schedule(lease, min(granted_at, time.monotonic()) + self._interval)
        self._schedules[lease] = schedule
        self._push(schedule)
        self._wake()

    def discard(self, lease: Lease) -> None:
        """Stop renewing `lease` (it does not end: the caller decides what it became)."""
        self._schedules.pop(lease, None)

    async def run(self) -> None:
        """Renew the leases as they come due, until cancelled.

        An error other than `ServiceUnavailable` from `renew` (a bug, or a request the
        service rejects as invalid) stops the keeper and is raised from here.
        """
        try:
            async with anyio.create_task_group() as calls:
                while True:
                    self._wakeup = anyio.Event()
                    for chunk in self._take_due(time.monotonic()):
                        calls.start_soon(self._renew_chunk, chunk)
                    delay = self._heap[0][0] - time.monotonic() if self._heap else None
                    if delay is None or delay > 0:
                        with anyio.move_on_after(delay):
                            await self._wakeup.wait()
        except ExceptionGroup as failures:
            raise failures.exceptions[0] from None

    # -- the schedule ---------------------------------------------------------------------

    def _push(self, schedule: _Schedule) -> None:
        schedule.version += 1
        deadline = schedule.lease._deadline
        at = deadline if schedule.in_flight else min(schedule.due, deadline)
        heapq.heappush(self._heap, (at, next(self._order), schedule.version, schedule))

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _take_due(self, now: float) -> list[list[_Schedule]]:
        """End the leases that ran out and take those due by `now + coalesce`, in batches.

        Nothing is taken before something is due, so a batch stays `coalesce` wide
        however often the loop is woken.
        """
        due: list[_Schedule] = []
        waiting: list[_Schedule] = []
        heap = self._heap
        if not heap or heap[0][0] > now:
            return []
        while heap and heap[0][0] <= now + self._coalesce:
            _, _, version, schedule = heapq.heappop(heap)
            if version != schedule.version or self._schedules.get(schedule.lease) is not schedule:
                continue
            if schedule.lease._deadline <= now:
                self._lose(schedule, EXPIRED)
            elif schedule.in_flight:
                waiting.append(schedule)  # its deadline is near: look again then
            else:
                schedule.in_flight = True
                due.append(schedule)
        for schedule in (*waiting, *due):
            self._push(schedule)
        size = self._batch_size
        return [due[start : start + size] for start in range(0, len(due), size)]

    def _lose(self, schedule: _Schedule, reason: str) -> None:
        del self._schedules[schedule.lease]
        schedule.lease._end(reason)
        if self._on_lost is not None:
            self._on_lost(schedule.lease)

    def _current(self, schedule: _Schedule) -> bool:
        return self._schedules.get(schedule.lease) is schedule

    async def _renew_chunk(self, chunk: list[_Schedule]) -> None:
        async with self._calls:
            sent_at = time.monotonic()
            # The SDK checks each deadline before it renews, never after.
            live = []
            for schedule in chunk:
                if not self._current(schedule):
                    continue
                if schedule.lease._deadline <= sent_at:
                    self._lose(schedule, EXPIRED)
                else:
                    live.append(schedule)
            if not live:
                return
            # The latest deadline bounds the call; an earlier one is watched by `run()`.
            left = max(schedule.lease._deadline for schedule in live) - sent_at
            try:
                answers = await self._renew(
                    [schedule.lease for schedule in live], min(self._rpc_timeout, left)
                )
            except AccessRefused as exc:
                if not isinstance(exc, QuotaExceeded):
                    # Refused for who this client is (credentials revoked, a rule
                    # changed): no retry will renew these leases, so they end now.
                    for schedule in live:
                        if self._current(schedule):
                            self._lose(schedule, f"the service refused to renew it: {exc}")
                    return
                # Over the call-rate quota: like an outage, waited out while they hold.
                self._retry_later(live)
                return
            except ServiceUnavailable:
                # One failed call is not a loss: retry while the leases still hold.
                self._retry_later(live)
                return
        answered_at = time.monotonic()
        for schedule, answer in zip(live, answers, strict=True):
            if not self._current(schedule):
                continue  # ended while the call was in flight: never revived
            lease = schedule.lease
            if answer is None:
                self._lose(schedule, REFUSED)
            elif lease._deadline <= answered_at:
                self._lose(schedule, EXPIRED)
            else:
                ttl, token = answer
                lease._renewed(sent_at, ttl, self._margin, token)
                schedule.backoff = RETRY_FIRST_S
                self._settle(schedule, sent_at + self._interval)

    def _retry_later(self, schedules: list[_Schedule]) -> None:
        """Renew `schedules` again after their backoff (doubled each time, up to the interval)."""
        retry_at = time.monotonic() + schedules[0].backoff * random.uniform(0.5, 1.0)
        for schedule in schedules:
            schedule.backoff = min(schedule.backoff * 2, self._interval)
            self._settle(schedule, retry_at)

    def _settle(self, schedule: _Schedule, due: float) -> None:
        if self._current(schedule):
            schedule.in_flight = False
            schedule.due = due
            self._push(schedule)
            self._wake()


async def keep_alive(
    lease: Lease, renew: Renew, *, interval: float, margin: float, rpc_timeout: float
) -> str:
    """Renew `lease` every `interval` seconds until it ends; return why it ended.

    A failed call is retried with backoff for as long as the lease is still valid;
    only a refusal from the service or the lease running out (or a release) ends it.
    """

    async def renew_one(leases: Sequence[Lease], timeout: float) -> list[tuple[float, int] | None]:
        return [await renew(timeout)]

    keeper = LeaseKeeper(renew_one, interval=interval, margin=margin, rpc_timeout=rpc_timeout)
    keeper.add(lease)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(keeper.run)
            reason = await lease.wait_ended()
            group.cancel_scope.cancel()
    except ExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return reason
