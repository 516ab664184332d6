"""Leading a lock from the command line: fail fast when the service cannot be
reached, then wait for the lock the SDK's way (`QuorumQuestClient.leadership()`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from quorum_quest.client import Lease, QuorumQuestClient
from quorum_quest.command._exit import Exit, Failure


@asynccontextmanager
async def leading(client: QuorumQuestClient, wait: float | None) -> AsyncIterator[Lease]:
    """Lead `client`'s lock for the block, waiting up to `wait` seconds (None: forever).

    The first attempt is made at once and its error, if any, ends the command (the
    service is down, the identity is refused): a script learns that now rather than
    when --wait runs out. From then on `leadership()` waits, rides out outages, keeps
    the lease alive, raises `LeadershipLost` in the block when the lease is lost,
    and releases the lock on exit.
    """
    name = f"{client.service}/{client.domain}"
    if not await client.try_acquire_lock() and wait == 0:
        raise Failure(Exit.NOT_ACQUIRED, f"{name} is held by someone else")
    entered = False
    try:
        async with client.leadership(timeout=wait) as lease:
            entered = True
            yield lease
    except TimeoutError:
        if entered:
            raise
        raise Failure(Exit.NOT_ACQUIRED, f"could not acquire {name} within {wait:g} s") from None
