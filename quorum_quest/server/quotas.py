"""Quotas per identity, kept by this instance: leases held and calls per second.

What they guarantee, with `auth.quotas` set:

- `maxLeasesPerIdentity`: an identity holds at most that many live leases granted or
  renewed through this instance. An acquire of a lock it does not hold yet is refused
  RESOURCE_EXHAUSTED before the store is asked; while the acquire runs it takes a place,
  so concurrent acquires cannot overshoot. Renewals and re-acquires of a held lock are
  never refused: lowering the quota on a reload stops new leases, not live ones.
- `callsPerSecondPerIdentity`: an identity's calls are admitted by a token bucket that
  refills at that rate and holds one second's worth (at least one call); a call that
  finds it empty is refused RESOURCE_EXHAUSTED. `KeepAliveMany` is one call.
- both are counted per instance, in memory: N instances behind a load balancer admit up
  to N times as much, and a restart starts afresh. Leases are counted from the moment
  the quota is set (a reload that sets it counts leases as they are renewed).

The counts outlive configuration reloads (they live in the `Runtime`); the limits come
from the configuration in force.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from quorum_quest.errors import QuotaExceeded
from quorum_quest.stores import LockKey

# Buckets kept before full (idle) ones are dropped: identities are few, but bounded anyway.
MAX_BUCKETS = 10_000


class LeaseLedger:
    """Live leases per identity, as granted, renewed and ended through this instance."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # identity -> lock -> end of the lease (clock seconds; inf while an acquire runs)
        self._held: dict[str, dict[LockKey, float]] = {}

    def reserve(self, identity: str, key: LockKey, limit: int) -> bool:
        """Take a place for an acquire of `key`; True if it was not held (the place is
        new, to give back with `ended` unless the acquire is granted). Raises
        `QuotaExceeded` when `identity` holds `limit` live leases of other locks."""
        leases = self._held.setdefault(identity, {})
        if key in leases:
            return False
        if 0 < limit <= len(leases):
            now = self._clock()
            for held in [held for held, end in leases.items() if end <= now]:
                del leases[held]
            if len(leases) >= limit:
                raise QuotaExceeded(
                    f"{identity} holds {len(leases)} leases here, the most"
                    f" auth.quotas.maxLeasesPerIdentity allows ({limit}); release one first",
                    identity,
                )
        leases[key] = math.inf
        return True

    def granted(self, identity: str, key: LockKey, ttl_ms: int) -> None:
        self._held.setdefault(identity, {})[key] = self._clock() + ttl_ms / 1000

    def ended(self, identity: str, key: LockKey) -> None:
        leases = self._held.get(identity)
        if leases is not None:
            leases.pop(key, None)
            if not leases:
                del self._held[identity]

    def held(self, identity: str) -> int:
        """Live leases (and acquires running) of `identity`."""
        now = self._clock()
        return sum(end > now for end in self._held.get(identity, {}).values())


class CallRate:
    """A token bucket per identity."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # identity -> [tokens, clock at last call]

    def take(self, identity: str, rate: float) -> None:
        """Admit one call of `identity`, or raise `QuotaExceeded`."""
        now = self._clock()
        burst = max(rate, 1.0)
        bucket = self._buckets.get(identity)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._drop_idle(now, rate, burst)
            bucket = self._buckets[identity] = [burst, now]
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            raise QuotaExceeded(
                f"{identity} is over auth.quotas.callsPerSecondPerIdentity ({rate:g} calls/s"
                " here); slow down",
                identity,
            )
        bucket[0] = tokens - 1

    def _drop_idle(self, now: float, rate: float, burst: float) -> None:
        """Forget the buckets that have refilled: they would start full anyway."""
        self._buckets = {
            identity: bucket
            for identity, bucket in self._buckets.items()
            if bucket[0] + (now - bucket[1]) * rate < burst
        }


class Quotas:
    """What this instance counts per identity, across configurations."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.leases = LeaseLedger(clock)
        self.calls = CallRate(clock)
