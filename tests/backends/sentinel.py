"""A Redis Sentinel topology for the tests: a primary, a replica and three sentinels.

Every process is a `redis-server` from Debian's package (`--sentinel` turns it into a
sentinel), on free 127.0.0.1 ports, each with a temporary folder of its own: sentinels
rewrite their config file there. Start-up waits until every sentinel knows the
replica and the other sentinels, so a failover can begin as soon as a test kills the
primary. The module adds no store variant: the contract suite runs on plain Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.backends.redis import NO_RETRY, RedisProcess

VARIANTS: list[Any] = []

MASTER_NAME = "qq-primary"
HOST = "127.0.0.1"
SENTINELS = 3
QUORUM = 2

# A full sync streams the snapshot at once instead of waiting 5 s for more replicas.
_NODE_ARGS = ("--repl-diskless-sync-delay", "0")
_SENTINEL_CONF = """\
sentinel monitor {name} {host} {port} {quorum}
sentinel down-after-milliseconds {name} {down_after_ms}
sentinel failover-timeout {name} {failover_timeout_ms}
sentinel parallel-syncs {name} 1
"""


def _client(address: str) -> redis.Redis:
    host, _, port = address.rpartition(":")
    return redis.Redis(
        host=host,
        port=int(port),
        socket_timeout=1,
        socket_connect_timeout=1,
        retry=NO_RETRY,
        decode_responses=True,
    )


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Redis Sentinel topology: no {what} within {timeout:g} s")
        time.sleep(0.1)


class SentinelTopology:
    """A primary, its replica and three sentinels watching it as `master_name` (quorum 2).

    `kill_primary` or `failover` begins a failover; `wait_for_failover` returns the
    address of the primary the sentinels agree on afterwards.
    """

    START_TIMEOUT_S = 30.0

    def __init__(
        self,
        master_name: str = MASTER_NAME,
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.nodes: list[RedisProcess] = []
        self.sentinels: list[RedisProcess] = []
        self.killed: list[RedisProcess] = []
        self._before_failover: str | None = None

    @property
    def sentinel_addresses(self) -> list[str]:
        return [sentinel.address for sentinel in self.sentinels]

    @property
    def sentinel_endpoints(self) -> list[tuple[str, int]]:
        """The sentinels as redis-py's `Sentinel` takes them."""
        return [(HOST, sentinel.port) for sentinel in self.sentinels]

    def start(self) -> SentinelTopology:
        try:
            primary = RedisProcess(*_NODE_ARGS)
            self.nodes.append(primary)
            primary.start()
            replica = RedisProcess(*_NODE_ARGS, "--replicaof", HOST, str(primary.port))
            self.nodes.append(replica)
            replica.start()
            config = _SENTINEL_CONF.format(
                name=self.master_name,
                host=HOST,
                port=primary.port,
                quorum=QUORUM,
                down_after_ms=self.down_after_ms,
                failover_timeout_ms=self.failover_timeout_ms,
            )
            for _ in range(SENTINELS):
                sentinel = RedisProcess("--sentinel", config=config)
                self.sentinels.append(sentinel)
                sentinel.start()
            self.wait_for_replicas(self.START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process, sentinels first so that none of them starts a failover."""
        for process in [*self.sentinels, *self.nodes]:
            process.__exit__()

    def node(self, address: str) -> RedisProcess:
        """The data node (primary or replica) listening at `address`."""
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(f"no data node at {address}")

    def primary_address(self) -> str:
        """The primary's "host:port" according to the first sentinel that answers."""
        for address in self.sentinel_addresses:
            try:
                with _client(address) as sentinel:
                    host, port = sentinel.sentinel_get_master_addr_by_name(self.master_name)
                return f"{host}:{port}"
            except redis.RedisError:
                continue
        raise RuntimeError(f"no sentinel answers for {self.master_name}")

    def kill_primary(self) -> str:
        """SIGKILL the current primary; returns its address."""
        address = self.primary_address()
        primary = self.node(address)
        primary.kill()
        if primary not in self.killed:
            self.killed.append(primary)
        self._before_failover = address
        return address

    def failover(self) -> None:
        """SENTINEL FAILOVER: promote a replica while the primary still runs.

        The old primary goes on taking writes until the sentinels make it a replica,
        ~10 s later (`wait_for_replicas`); clients that ask a sentinel move on at once.
        """
        self._before_failover = self.primary_address()
        for address in self.sentinel_addresses:
            try:
                with _client(address) as sentinel:
                    sentinel.sentinel_failover(self.master_name)
                return
            except (redis.ConnectionError, redis.TimeoutError):
                continue
        raise RuntimeError(f"no sentinel answers for {self.master_name}")

    def wait_for_failover(self, timeout: float = 30.0) -> str:
        """The new primary's address, once the answering sentinels (a quorum) agree on it
        and it reports itself primary."""
        if self._before_failover is None:
            raise RuntimeError("no failover begun: call kill_primary() or failover() first")
        before = self._before_failover
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            agreed = self._agreed_primary()
            if agreed is not None and agreed != before and self._is_primary(agreed):
                self._before_failover = None
                return agreed
            time.sleep(0.1)
        raise TimeoutError(f"no failover away from {before} within {timeout:g} s")

    def restart_killed(self, timeout: float = 30.0) -> None:
        """Start the killed nodes again on their ports, empty, replicating the current primary.

        A node that is still the sentinels' primary (no failover yet) comes back as that
        primary, empty: its replicas then resynchronise from it and lose their data too.
        """
        primary = self.primary_address()
        host, _, port = primary.rpartition(":")
        for node in self.killed:
            replicaof = () if node.address == primary else ("--replicaof", host, port)
            node.extra_args = (*_NODE_ARGS, *replicaof)
            node.restart()
        self.killed.clear()
        self.wait_for_replicas(timeout)

    def wait_for_replicas(self, timeout: float = 30.0) -> None:
        """Until every running node but the primary is in sync with it, and every running
        sentinel sees that node up and knows the other sentinels."""
        primary = self.primary_address()
        for node in self.nodes:
            if node.running and node.address != primary:
                _wait(lambda node=node: self._replicates(node, primary), timeout, "sync")
                _wait(lambda node=node: self._sentinels_see(node.address), timeout, "sentinels")

    def _agreed_primary(self) -> str | None:
        """The primary that the answering sentinels (at least a quorum) all see up."""
        seen = []
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with _client(sentinel.address) as client:
                    state = client.sentinel_master(self.master_name)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                return None
            seen.append(f"{state['ip']}:{state['port']}")
        return seen[0] if len(seen) >= QUORUM and len(set(seen)) == 1 else None

    @staticmethod
    def _is_primary(address: str) -> bool:
        try:
            with _client(address) as client:
                return client.execute_command("ROLE")[0] == "master"
        except redis.RedisError:
            return False

    @staticmethod
    def _replicates(replica: RedisProcess, primary: str) -> bool:
        """True when `replica` is linked to `primary` and done with its initial sync."""
        try:
            with _client(replica.address) as client:
                info = client.info("replication")
        except redis.RedisError:
            return False
        return (
            f"{info.get('master_host')}:{info.get('master_port')}" == primary
            and info.get("master_link_status") == "up"
            and not info.get("master_sync_in_progress")
        )

    def _sentinels_see(self, replica: str) -> bool:
        """True when each running sentinel sees the primary up, `replica` up (a candidate for
        the next failover) and the other sentinels."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with _client(sentinel.address) as client:
                    master = client.sentinel_master(self.master_name)
                    replicas = client.sentinel_slaves(self.master_name)
                    peers = client.sentinel_sentinels(self.master_name)
            except redis.RedisError:
                return False
            if master["is_sdown"] or master["is_odown"] or len(peers) < SENTINELS - 1:
                return False
            if not any(
                f"{entry['ip']}:{entry['port']}" == replica
                and not (entry["is_sdown"] or entry["is_disconnected"])
                for entry in replicas
            ):
                return False
        return True

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def sentinel_topology() -> Iterator[SentinelTopology]:
    """A fresh topology per test (~2 s to start): tests kill its primary and fail it over."""
    try:
        topology = SentinelTopology().start()
    except (RuntimeError, OSError, redis.RedisError) as exc:
        pytest.fail(f"Redis Sentinel is required and could not be started: {exc}", pytrace=False)
    try:
        yield topology
    finally:
        topology.close()
