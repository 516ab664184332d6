"""Watching who leads: `QuorumQuestClient.watch()` and `Callbacks.on_new_leader`.

What a watch guarantees:

- it yields the state of each watched lock first (`kind == "current"`; for a whole
  service, each lock held then), then every change the service reports, per lock in
  order, each grant with a larger fencing token than the lock's last one;
- it outlives the service instance it talks to: when the stream breaks (the instance
  shuts down and answers UNAVAILABLE, the connection drops) it opens a new one, after a
  backoff with jitter (0.1 s doubling to 5 s), and sends the last fencing token it saw
  per lock, so the new stream reports anything newer: nothing that changed meanwhile is
  missed, and a state it already yielded is not yielded again. What happened in between
  it cannot know step by step: such a change comes with `gap=True` (take it as the lock's
  whole state), as does one the service coalesced because this reader fell behind;
- it does no work while nobody iterates it, and stops (closing its stream) when the
  iteration ends (`break`, cancellation, `aclose()`); it ends by itself when the client
  is closed.

`Callbacks.on_new_leader` is called from `client.watching()` only: while that block is
open the client runs one watch and calls it (sync or async) with each change of leader.
Nothing runs in the background otherwise.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import anyio
import grpc

from quorum_quest._rpc import wire
from quorum_quest.client.status import rpc_error
from quorum_quest.errors import InvalidArgument

if TYPE_CHECKING:
    from quorum_quest.client.client import QuorumQuestClient

logger = logging.getLogger("quorum_quest.client")

Kind = Literal["current", "granted", "released", "expired", "lost"]
# A lock named for `watch()`: a domain of the client's service, or (service, domain).
LockName = str | tuple[str, str]
NewLeaderCallback = Callable[["LeaderChange"], "Awaitable[None] | None"]
# What `client.watching()` returns: a block during which `on_new_leader` is called.
Watching = AbstractAsyncContextManager[None]

_KINDS: dict[int, Kind] = {
    wire.LeaderChange.KIND_CURRENT: "current",
    wire.LeaderChange.KIND_GRANTED: "granted",
    wire.LeaderChange.KIND_RELEASED: "released",
    wire.LeaderChange.KIND_EXPIRED: "expired",
    wire.LeaderChange.KIND_LOST: "lost",
}
# Statuses after which a watch opens a new stream: the instance went away or could not
# read its store for now. Any other status is the caller's to handle.
RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,  # a connection torn down under the stream
        grpc.StatusCode.INTERNAL,  # a stream cut mid-message
        grpc.StatusCode.UNKNOWN,
    }
)
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0


@dataclass(frozen=True, slots=True)
class LeaderChange:
    """A lock's leader after a change (or, `kind == "current"`, as the watch began).

    `client_id` is "" and `fencing_token` 0 when nobody holds the lock; `remaining` is
    what was left of the holder's lease when the service sent it. `gap` says changes of
    this lock may have been missed before it: take it as the lock's whole state.
    """

    service: str
    domain: str
    client_id: str
    fencing_token: int
    kind: Kind
    remaining: timedelta
    gap: bool = False

    @property
    def has_leader(self) -> bool:
        return bool(self.client_id)


def _lock(service: str, name: LockName) -> tuple[str, str]:
    return (service, name) if isinstance(name, str) else (name[0], name[1])


def _change(message: Any) -> LeaderChange:  # a `wire.LeaderChange`
    return LeaderChange(
        service=message.service,
        domain=message.domain,
        client_id=message.client_id,
        fencing_token=message.fencing_token,
        kind=_KINDS.get(message.kind, "current"),
        remaining=timedelta(
            seconds=message.remaining.seconds, microseconds=message.remaining.nanos // 1000
        ),
        gap=message.gap,
    )


async def watch_leaders(
    client: QuorumQuestClient, locks: Iterable[LockName], service: str | None
) -> AsyncIterator[LeaderChange]:
    """The changes of `locks` (none and no `service`: the client's own lock) and of
    every lock of `service`, resuming across broken streams; see the module's promises.

    A status not worth a retry is raised as every call of the client raises it:
    `InvalidArgument`, `PermissionDenied` (the rules do not let this caller read a lock),
    `ServiceUnavailable` (UNIMPLEMENTED: a store that cannot list a service's locks).
    """
    names = list(dict.fromkeys(_lock(client.service, lock) for lock in locks))
    if not names and service is None:
        names = [(client.service, client.domain)]
    explicit = set(names)
    what = ", ".join(f"{s}/{d}" for s, d in names[:3]) or f"{service}/*"
    seen: dict[tuple[str, str], int] = {}  # the last token yielded per lock (0: free)
    backoff = FIRST_BACKOFF_S
    while True:
        request = wire.WatchLeadersRequest(
            locks=[{"service": s, "domain": d} for s, d in names],
            service=service or "",
            resume=[
                {"service": s, "domain": d, "fencing_token": token}
                for (s, d), token in seen.items()
            ],
        )
        stub = client.stub
        channel = client._channel  # closed by `client.close()`: then the watch ends
        call = stub.watch_leaders(
            request, metadata=getattr(client, "_metadata", None), wait_for_ready=True
        )
        resumed = bool(seen)
        try:
            async for message in call:
                backoff = FIRST_BACKOFF_S
                change = _change(message)
                lock = (change.service, change.domain)
                if (
                    resumed
                    and change.kind == "current"
                    and not change.gap
                    and seen.get(lock, 0) == change.fencing_token
                ):
                    continue  # yielded before the stream broke
                if change.fencing_token or lock in explicit:
                    seen[lock] = change.fencing_token
                else:
                    seen.pop(lock, None)  # a free lock of the service: nothing to resume
                yield change
            reason = "the stream ended"
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code not in RESUMABLE:
                # As every other call of the client answers: InvalidArgument,
                # PermissionDenied, ...
                raise rpc_error(exc) from None
            reason = f"{code.name}: {exc.details() or code.name}"
        except asyncio.CancelledError:
            # grpc raises a bare CancelledError for a call its channel's closing cancelled:
            # not this task's cancellation, which goes on.
            task = asyncio.current_task()
            if task is not None and task.cancelling() or client._channel is channel:
                raise
            return
        finally:
            call.cancel()
        if client._channel is not channel:
            return  # the client was closed: nothing more to watch through it
        pause = backoff * random.uniform(0.5, 1.0)
        logger.info("watch of %s interrupted (%s); resuming in %.2f s", what, reason, pause)
        await asyncio.sleep(pause)
        backoff = min(backoff * 2, MAX_BACKOFF_S)


@asynccontextmanager
async def following_leaders(
    client: QuorumQuestClient, locks: Iterable[LockName], service: str | None
) -> AsyncIterator[None]:
    """While the block runs: call `client.callbacks.on_new_leader` with each change of
    leader of the watched locks (the first state included), from one watch task that the
    block owns. A change that keeps the leader (a resumed stream repeating it) is not
    passed on; a failing callback is logged and the watch goes on."""
    callback = client.callbacks.on_new_leader
    if callback is None:
        raise InvalidArgument("callbacks.on_new_leader", "is not set: nothing to call")
    leaders: dict[tuple[str, str], tuple[str, int]] = {}

    async def run() -> None:
        async for change in watch_leaders(client, locks, service):
            lock = (change.service, change.domain)
            leader = (change.client_id, change.fencing_token)
            if leaders.get(lock) == leader:
                continue
            leaders[lock] = leader
            try:
                result = callback(change)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("on_new_leader callback failed for %s/%s", *lock)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            try:
                yield
            finally:
                group.cancel_scope.cancel()
    except ExceptionGroup as errors:
        # The body's error, or the watch's, as itself rather than in a group.
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None
        raise
