"""The faults: each says what its scenario needs and how it is injected and healed.

A fault's `inject(run)` breaks something, waits, heals it, and returns the window
(`FaultWindow`) the checker measures liveness against: `blocking` when by design no
grant can happen until it heals (the only instance, or the backend itself, is down),
`victims` when it takes clients away. `state_loss` faults make the store lose its
state, so the grace period adds to the liveness bound. `restore(run)` undoes what a
fault leaves broken, before the next round of a soak run.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from redis.crc import key_slot

from quorum_quest.errors import StoreUnavailable
from quorum_quest.stores.base import LockKey
from quorum_quest.stores.redis import _lock_name
from tests.faults.history import FaultWindow

if TYPE_CHECKING:
    from tests.faults.scenario import Run

# Added latency on the service's link to the backend, each direction.
LATENCY_S = 0.2


class Fault(ABC):
    """One kind of fault. `instances`: service instances the scenario runs; `proxied`:
    whether they reach the backend through a `Proxy`; `own_backend`: the fault touches
    the backend process itself, so the scenario needs one of its own."""

    name: str = ""
    proxied: bool = False
    own_backend: bool = False
    state_loss: bool = False
    # Seconds the store may wait before it connects again to a backend that came back
    # (its reconnect delay): part of the liveness bound after such a fault.
    reconnect_s: float = 0.0

    def __init__(self, instances: int = 2) -> None:
        self.instances = instances

    @abstractmethod
    def inject(self, run: Run) -> FaultWindow:
        """Inject the fault, wait, heal it; the window from injection to healing."""

    def restore(self, run: Run) -> None:  # noqa: B027 - most faults heal themselves
        """Undo what `inject` left broken (a killed instance is started again by the run)."""

    def __repr__(self) -> str:
        return self.name


class KillInstance(Fault):
    """kill -9 the instance the holder talks to; the other instance serves on."""

    name = "kill-instance"

    def inject(self, run: Run) -> FaultWindow:
        victim = run.instances[run.instance_of(run.holder())]
        return run.timed(f"kill -9 {victim.name}", victim.kill)


class PauseInstance(Fault):
    """SIGSTOP the holder's instance for longer than a lease, then SIGCONT: it wakes up
    with calls its clients gave up on long ago."""

    name = "pause-instance"

    def inject(self, run: Run) -> FaultWindow:
        victim = run.instances[run.instance_of(run.holder())]

        def pause() -> None:
            victim.pause()
            time.sleep(run.timing.outage)
            victim.resume()

        return run.timed(f"SIGSTOP {victim.name}", pause, blocking=len(run.instances) == 1)


class PauseClient(Fault):
    """SIGSTOP the process of the client holding the lock for longer than its lease, then
    SIGCONT: on resume its belief has ended, and another client must have led meanwhile."""

    name = "pause-client"

    def inject(self, run: Run) -> FaultWindow:
        victim = run.process_of(run.holder())

        def pause() -> None:
            victim.pause()
            time.sleep(run.timing.outage)
            victim.resume()

        return run.timed(f"SIGSTOP {victim.name}", pause, victims=victim.client_ids)


class Partition(Fault):
    """Blackhole the holder's instance's link to the backend for longer than a lease: its
    calls hang, and on healing whatever they sent reaches the backend late."""

    name = "partition"
    proxied = True

    def inject(self, run: Run) -> FaultWindow:
        index = run.instance_of(run.holder())
        proxy = run.proxies[index]

        def cut() -> None:
            proxy.blackhole()
            time.sleep(run.timing.outage)
            proxy.heal()

        return run.timed(
            f"partition instance-{index} from the backend", cut, blocking=len(run.proxies) == 1
        )


class Latency(Fault):
    """Add `LATENCY_S` each way on every instance's link to the backend for a while.

    Safety is judged throughout; liveness from its end, as a store operation of several
    round trips (a refused acquire on dynalite takes four) can outlast every deadline."""

    name = "latency"
    proxied = True

    def inject(self, run: Run) -> FaultWindow:
        def slow() -> None:
            for proxy in run.proxies:
                proxy.pass_through(delay=LATENCY_S)
            time.sleep(run.timing.outage)
            for proxy in run.proxies:
                proxy.pass_through()

        return run.timed(f"+{LATENCY_S * 1000:.0f} ms each way to the backend", slow, blocking=True)


class RestartInstance(Fault):
    """kill -9 the only instance and start it again on its port. With the embedded store
    every lease is gone: the new process starts in its grace period."""

    name = "restart"
    state_loss = True

    def inject(self, run: Run) -> FaultWindow:
        victim = run.instances[0]

        def restart() -> None:
            victim.kill()
            victim.start()

        return run.timed(f"restart {victim.name}", restart, blocking=True)


class RestartBackend(Fault):
    """kill -9 the backend process and start it again on its port (`run.backend.process`:
    `kill()` and `restart()`). `state_loss`: it comes back without its data.

    `until_serving`: the fault lasts until the store, asked from the test process,
    answers a read the way a grant needs it (ScyllaDB: a SERIAL read, through Paxos),
    not merely until the port answers. A JVM that has just started can take seconds
    more for that on a busy machine, and that time is the backend's restart, not the
    service's takeover, which the liveness bound judges."""

    name = "backend-restart"
    own_backend = True

    def __init__(
        self,
        instances: int = 2,
        state_loss: bool = True,
        reconnect_s: float = 0.0,
        until_serving: bool = False,
    ) -> None:
        super().__init__(instances)
        self.state_loss = state_loss
        self.reconnect_s = reconnect_s
        self.until_serving = until_serving

    def inject(self, run: Run) -> FaultWindow:
        backend = run.backend.process

        def restart() -> None:
            backend.kill()
            backend.restart()
            if self.until_serving:
                asyncio.run(_until_serving(run))

        return run.timed("backend kill -9 and restart", restart, blocking=True)


async def _until_serving(run: Run, budget_s: float = 120.0) -> None:
    """Return once a store of the scenario's settings starts and reads a lock (the read
    a grant makes first), trying again until `budget_s` has passed."""
    from quorum_quest.stores.registry import store_class  # here: a test-only path
    from tests.conftest import make_settings

    settings = make_settings(run.backend.type, run.backend.store).store_settings()
    deadline = time.monotonic() + budget_s
    while True:
        store = store_class(run.backend.type)(settings)
        try:
            await store.start()
            try:
                await store.get_leader(LockKey("fault-probe", "serving"))
            finally:
                await store.close()
            return
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


class SentinelFailover(Fault):
    """kill -9 the Redis primary behind Sentinel (`run.backend.process`: a
    `SentinelTopology`); a replica, which may lack the last writes, takes over."""

    name = "sentinel-failover"
    own_backend = True
    state_loss = True

    def inject(self, run: Run) -> FaultWindow:
        topology = run.backend.process

        def fail_over() -> None:
            topology.kill_primary()
            topology.wait_for_failover()

        return run.timed("kill -9 the Redis primary, Sentinel failover", fail_over, blocking=True)

    def restore(self, run: Run) -> None:
        run.backend.process.restart_killed()


def _lock_slot(run: Run) -> int:
    """The Redis Cluster slot of the scenario's lock."""
    from tests.faults.scenario import SERVICE  # here: scenario imports this module

    return key_slot(_lock_name(LockKey(SERVICE, run.domain)).encode())


class ClusterFailover(Fault):
    """kill -9 the Redis Cluster primary that serves the scenario's lock
    (`run.backend.process`: a `RedisCluster`); its replica, which may lack the last
    writes, takes over, and the store starts the grace period for that shard's slots."""

    name = "cluster-failover"
    own_backend = True
    state_loss = True

    def inject(self, run: Run) -> FaultWindow:
        cluster = run.backend.process
        slot = _lock_slot(run)

        def fail_over() -> None:
            cluster.kill_primary_of(slot)
            cluster.wait_for_failover(slot)

        return run.timed(
            "kill -9 the lock's Redis Cluster primary, replica failover", fail_over, blocking=True
        )

    def restore(self, run: Run) -> None:
        run.backend.process.restart_killed()


class ClusterPrimaryRestart(Fault):
    """kill -9 the Redis Cluster primary that serves the scenario's lock and start it
    again at once, empty (`run.backend.process`: a `RedisCluster`). Its replica is
    stopped first, so that no failover races the restart: the primary comes back with
    its slots and none of their data."""

    name = "cluster-primary-restart"
    own_backend = True
    state_loss = True

    def inject(self, run: Run) -> FaultWindow:
        cluster = run.backend.process
        primary = cluster.owner(_lock_slot(run))
        replica = cluster.replica_of(primary)
        replica.kill()
        cluster.killed.append(replica)

        def restart() -> None:
            primary.restart()
            cluster.wait_until_ok()

        return run.timed(
            "kill -9 the lock's Redis Cluster primary, restart empty", restart, blocking=True
        )

    def restore(self, run: Run) -> None:
        run.backend.process.restart_killed()


class ClusterSlotMigration(Fault):
    """Move the slot of the scenario's lock to another Redis Cluster primary while the
    clients race (`run.backend.process`: a `RedisCluster`). No data is lost, but the
    slot's state marker names the old primary: the new one starts the slot's grace
    period (docs/backends/redis.md, Redis Cluster, limits)."""

    name = "cluster-slot-migration"
    own_backend = True
    state_loss = True

    def inject(self, run: Run) -> FaultWindow:
        cluster = run.backend.process
        slot = _lock_slot(run)
        return run.timed(
            "migrate the lock's Redis Cluster slot to another primary",
            lambda: cluster.migrate_slot(slot),
            blocking=True,
        )
