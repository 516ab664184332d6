"""A lease this client holds, and the one loop that keeps it alive."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from quorum_quest.errors import LeadershipLost, ServiceUnavailable


@dataclass(eq=False)
class Lease:
    """The right to act as holder of (service, domain) until `remaining` reaches zero.

    Validity is judged on this process's monotonic clock from the send time of the
    last successful acquire or keep-alive, minus a safety margin, so the client
    stops believing it leads before the service can give the lock to anyone else.
    A process paused longer than the lease (GC, SIGSTOP) can still act on a stale
    belief between two checks: pass `fencing_token` to whatever you protect, and
    have it reject tokens older than the newest it has seen.
    """

    service: str
    domain: str
    client_id: str
    fencing_token: int
    ttl: float  # seconds granted by the service
    _deadline: float = field(repr=False)  # time.monotonic() after which it is not guaranteed

    @property
    def remaining(self) -> float:
        """Seconds left until this client must stop acting as holder (0 when expired)."""
        return max(0.0, self._deadline - time.monotonic())

    @property
    def is_valid(self) -> bool:
        return time.monotonic() < self._deadline

    def ensure_valid(self) -> None:
        """Raise `LeadershipLost` unless the lease still holds; call it before a side effect."""
        if not self.is_valid:
            raise LeadershipLost(f"lease on {self.service}/{self.domain} expired")

    def _renewed(self, sent_at: float, ttl: float, margin: float, token: int) -> None:
        self.ttl = ttl
        self._deadline = sent_at + ttl - margin
        if token:
            self.fencing_token = token


# `renew(timeout)` asks the service to extend the lease within `timeout` seconds and
# returns the granted ttl and token, or None when the service says we do not hold it.
Renew = Callable[[float], Awaitable["tuple[float, int] | None"]]

RETRY_FIRST_S = 0.05


async def keep_alive(
    lease: Lease, renew: Renew, *, interval: float, margin: float, rpc_timeout: float
) -> str:
    """Renew `lease` every `interval` seconds until it is lost; return why it was lost.

    A failed call is retried with backoff for as long as the lease is still valid;
    only a refusal from the service or the lease running out ends the loop.
    """
    next_renewal = time.monotonic() + interval
    backoff = RETRY_FIRST_S
    while True:
        await anyio.sleep(max(0.0, min(next_renewal, lease._deadline) - time.monotonic()))
        sent_at = time.monotonic()
        left = lease._deadline - sent_at
        if left <= 0:
            return "the lease expired before it could be renewed"
        try:
            granted = await renew(min(rpc_timeout, left))
        except ServiceUnavailable:
            # One failed call is not a loss: retry while the lease still holds.
            next_renewal = time.monotonic() + backoff * random.uniform(0.5, 1.0)
            backoff = min(backoff * 2, interval)
            continue
        if granted is None:
            return "the service says this client no longer holds the lock"
        ttl, token = granted
        lease._renewed(sent_at, ttl, margin, token)
        backoff = RETRY_FIRST_S
        next_renewal = sent_at + interval
