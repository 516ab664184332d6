"""Leading a lock: what `client.wait_for_leadership()`, `client.leadership()` and
`client.leaderships()` do, and the `Callbacks` called as this client starts and stops
leading.

What they guarantee:

- a wait for leadership hands over only a lease granted to this client, and releases
  (best effort) any grant it does not hand over because a timeout or a cancellation
  struck first, rather than leave it to block the lock for a whole ttl;
- the body of `leadership()` starts only on a valid lease and is cancelled the moment
  the lease can no longer be guaranteed, raising `LeadershipLost` whatever it awaited;
  a cancellation from outside stays a cancellation; the lock is released on exit;
- `leaderships()` holds a `LeaseSet` (`quorum_quest.client.lease_set`) whose leases each
  keep those promises on their own: a lost lease leaves the set, the block goes on.

Nothing here renews a lease: keep-alive is `quorum_quest.client.lease`'s alone. These
are functions of a client, each behind a thin method of `QuorumQuestClient`, so that
`client.py` holds the client (connection, state, the Go client's calls) and this module
what waiting for and holding leadership means on top of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from quorum_quest.client.lease import EXPIRED, Lease
from quorum_quest.client.lease_set import LeaseSet, LockName
from quorum_quest.client.status import BEST_EFFORT_FAILURES
from quorum_quest.client.watch import NewLeaderCallback
from quorum_quest.errors import LeadershipLost, QuotaExceeded, ServiceUnavailable

if TYPE_CHECKING:
    from quorum_quest.client.client import QuorumQuestClient

logger = logging.getLogger("quorum_quest.client")

LeaseCallback = Callable[[Lease], "Awaitable[None] | None"]

# How long one acquire may ask the service to wait for a release (TryAcquire wait_ms).
WAIT_FOR_RELEASE_S = 5.0


@dataclass(frozen=True)
class Callbacks:
    """Called (sync or async) when this client becomes leader and when it stops being one;
    `on_new_leader` with each change of leader, only inside `client.watching()`."""

    on_leader_elected: LeaseCallback | None = None
    on_leader_lost: LeaseCallback | None = None
    on_new_leader: NewLeaderCallback | None = None


def _cancelled_from_outside(task: asyncio.Task[Any], cancelling_before: int) -> bool:
    """Whether `task` has been cancelled from outside since it was cancelled
    `cancelling_before` times: by `Task.cancel()` or by a cancel scope around it."""
    return task.cancelling() > cancelling_before or anyio.current_effective_deadline() == -math.inf


async def wait_for_leadership(client: QuorumQuestClient, timeout: float | None) -> Lease:
    """`client.wait_for_leadership(timeout)`: acquire until `client` leads, call
    `on_leader_elected`, return the lease; give back a grant not handed over."""
    held = client._lease  # a lease held before this call stays the caller's
    try:
        with anyio.fail_after(timeout):
            lease = await _acquire_until_leading(client)
            if lease is not held:
                await client._notify(client.callbacks.on_leader_elected, lease)
    except BaseException:
        await _give_back(client, held)
        raise
    return lease


async def _acquire_until_leading(client: QuorumQuestClient) -> Lease:
    """Try to acquire (with backoff and jitter) until `client` leads; its lease."""
    delay = 0.05
    while True:
        try:
            # The service answers as soon as the lock is released or its
            # holder's lease ends, or after WAIT_FOR_RELEASE_S.
            if await client._try_acquire(WAIT_FOR_RELEASE_S):
                assert client._lease is not None
                return client._lease
            # Poll faster as the holder's lease nears its end, never busier than 50 ms.
            hint = client._holder_hint or delay
            pause = 0.0 if client._service_waited else max(0.05, min(delay, hint))
        except (ServiceUnavailable, QuotaExceeded) as exc:
            # An outage or a quota (calls per second, leases held) is waited out;
            # a refusal for credentials or rules is the caller's to see at once.
            logger.warning("waiting for %s/%s: %s", client.service, client.domain, exc)
            pause = delay
        await anyio.sleep(pause * random.uniform(0.5, 1.0))
        delay = min(delay * 2, max(0.05, client.keep_alive_interval))


async def _give_back(client: QuorumQuestClient, held: Lease | None) -> None:
    """Release what a wait for leadership that ends without handing over a lease may
    have been granted: the lease it made, or, when its last acquire got no answer,
    whatever lease the service says `client` holds. `held` (a lease from before
    the wait) is kept. Best effort: a failure is logged."""
    with anyio.CancelScope(shield=True):
        try:
            if client._lease is not None:
                if client._lease is not held:
                    await client.release_lock()
            elif client._grant_in_doubt:
                leader = await client.get_leader()
                if leader is not None and leader[0] == client.client_id:
                    await client._release_lease(client.service, client.domain, leader[1])
        except BEST_EFFORT_FAILURES as exc:
            logger.warning(
                "could not release the grant of %s/%s: %s", client.service, client.domain, exc
            )


@asynccontextmanager
async def leadership(client: QuorumQuestClient, timeout: float | None) -> AsyncIterator[Lease]:
    """`client.leadership(timeout)`: lead for the duration of the block, or raise
    `LeadershipLost` the moment the lease can no longer be guaranteed."""
    held = client._lease
    try:
        with anyio.fail_after(timeout):
            lease = await _acquire_until_leading(client)
    except BaseException:
        await _give_back(client, held)
        raise
    client.stop_keep_alive()
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    lost: LeadershipLost | None = None
    try:
        try:
            async with anyio.create_task_group() as guard:

                async def keep() -> None:
                    nonlocal lost
                    reason = await client._keep_until_lost(lease)
                    lost = LeadershipLost(f"lost {client.service}/{client.domain}: {reason}")
                    guard.cancel_scope.cancel()

                guard.start_soon(keep)
                try:
                    if lease is not held:
                        await client._notify(client.callbacks.on_leader_elected, lease)
                    if lease.is_valid:
                        yield lease
                    else:  # ran out before the keep-alive noticed: never enter the body
                        reason = lease.end_reason or EXPIRED
                        lost = LeadershipLost(f"lost {client.service}/{client.domain}: {reason}")
                finally:
                    guard.cancel_scope.cancel()
        except ExceptionGroup as errors:
            # The body's error (or the keep-alive's) as itself, not in a group.
            if len(errors.exceptions) == 1:
                raise errors.exceptions[0] from None
            raise
    except asyncio.CancelledError:
        # A gRPC call cancelled by the keep-alive's cancel scope raises grpc's own
        # CancelledError, which anyio does not recognise as the scope's: the loss
        # all the same, unless the caller was cancelled from outside too.
        if lost is None or _cancelled_from_outside(task, cancelling):
            raise
    finally:
        with anyio.CancelScope(shield=True):
            if lost is None:
                try:
                    await client.release_lock()
                except BEST_EFFORT_FAILURES as exc:
                    logger.warning(
                        "could not release %s/%s: %s", client.service, client.domain, exc
                    )
            elif client._lease is lease:
                await client._drop_lease(lease.end_reason or EXPIRED)
    if lost is not None:
        raise lost


@asynccontextmanager
async def leaderships(
    client: QuorumQuestClient, locks: Iterable[LockName], callbacks: Callbacks | None
) -> AsyncIterator[LeaseSet]:
    """`client.leaderships(locks, callbacks=callbacks)`: hold as many of `locks` as are
    free, all kept alive together, for the block; release them on exit."""
    try:
        async with anyio.create_task_group() as group:
            leases = LeaseSet(client, locks, callbacks or Callbacks(), group)
            try:
                # Renewing from the first grant on: acquiring thousands takes a while.
                await group.start(leases._keep)
                await leases.try_acquire()
                yield leases
            finally:
                with anyio.CancelScope(shield=True):
                    await leases._close()
    except ExceptionGroup as errors:
        # The body's error, or the keeper's, as itself rather than in a group.
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None
        raise
