"""A Redis Cluster for the tests: 3 primaries and 3 replicas on 127.0.0.1.

Six `redis-server` processes in cluster mode (each in a temporary folder of its own,
where it keeps `nodes.conf`), joined by `redis-cli --cluster create --cluster-replicas 1`.
Start-up waits, without a time budget that depends on the machine's speed beyond a
generous ceiling, until every node reports `cluster_state:ok` and knows all six nodes.
The contract suite runs on it as the variant `redis-cluster` (the `redis` store with
`cluster: true`); a cluster that cannot be started fails the run, it is never skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.backends import DIE_WITH_PARENT, free_port
from tests.backends.redis import NO_RETRY, STORE_TIMEOUT_S, RedisProcess

VARIANTS = [pytest.param("redis-cluster", marks=pytest.mark.redis)]

HOST = "127.0.0.1"
PRIMARIES = 3
# Generous: six servers and a cluster handshake on a loaded 2-core machine.
START_TIMEOUT_S = 120.0
# How long a node may be silent before the others count it as failed (and its replica
# takes over): short, so that fault tests fail over in seconds.
NODE_TIMEOUT_MS = 2_000


class ClusterNode(RedisProcess):
    """One cluster-mode `redis-server`, started with the DIE_WITH_PARENT prefix."""

    START_TIMEOUT_S = START_TIMEOUT_S

    def __init__(self) -> None:
        super().__init__(
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            # A replica may take over whatever its link's age: tests kill primaries at will.
            "--cluster-replica-validity-factor",
            "0",
            "--repl-diskless-sync-delay",
            "0",
            # The bus port, set apart: the default (port + 10000) fails above 55535.
            "--cluster-port",
            str(free_port()),
        )

    def command(self) -> list[str]:
        return [*DIE_WITH_PARENT, *super().command()]

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=self.port,
            socket_timeout=5,
            socket_connect_timeout=5,
            retry=NO_RETRY,
            decode_responses=True,
        )

    def cluster_info(self) -> dict[str, str]:
        """`CLUSTER INFO` as a mapping; empty when the node does not answer."""
        try:
            with self.client() as client:
                text = client.execute_command("CLUSTER INFO")
        except redis.RedisError:
            return {}
        if isinstance(text, dict):
            return {key: str(value) for key, value in text.items()}
        return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)

    def role(self) -> str:
        try:
            with self.client() as client:
                return str(client.execute_command("ROLE")[0])
        except redis.RedisError:
            return ""


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Redis Cluster: no {what} within {timeout:g} s")
        time.sleep(0.1)


class RedisCluster:
    """Six nodes: `PRIMARIES` primaries with a replica each, all slots assigned."""

    def __init__(self) -> None:
        self.nodes: list[ClusterNode] = []
        self.killed: list[ClusterNode] = []

    @property
    def seeds(self) -> list[str]:
        return [node.address for node in self.nodes]

    def start(self) -> RedisCluster:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH (run the README's test command)")
        try:
            for _ in range(2 * PRIMARIES):
                node = ClusterNode()
                self.nodes.append(node)
                node.start()
            created = subprocess.run(
                [
                    *DIE_WITH_PARENT,
                    cli,
                    "--cluster",
                    "create",
                    *self.seeds,
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
            )
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}"
                )
            self.wait_until_ok()
        except BaseException:
            self.close()
            raise
        return self

    def wait_until_ok(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every running node reports `cluster_state:ok`, knows every node and
        every slot, and each primary has its replica in sync."""

        def ok(node: ClusterNode) -> bool:
            info = node.cluster_info()
            return (
                info.get("cluster_state") == "ok"
                and info.get("cluster_slots_ok") == "16384"
                and info.get("cluster_known_nodes") == str(len(self.nodes))
            )

        for node in self.nodes:
            if node.running:
                _wait(lambda node=node: ok(node), timeout, f"cluster_state:ok on {node.address}")
        _wait(self._replicas_in_sync, timeout, "replica in sync")

    def _replicas_in_sync(self) -> bool:
        for node in self.nodes:
            if not node.running or node.role() != "slave":
                continue
            try:
                with node.client() as client:
                    info = client.info("replication")
            except redis.RedisError:
                return False
            if info.get("master_link_status") != "up" or info.get("master_sync_in_progress"):
                return False
        return True

    def primaries(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.running and node.role() == "master"]

    def node(self, address: str) -> ClusterNode:
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(f"no cluster node at {address}")

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        """The running node that replicates `primary`."""
        for node in self.nodes:
            if not node.running or node is primary:
                continue
            try:
                with node.client() as client:
                    info = client.info("replication")
            except redis.RedisError:
                continue
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
                return node
        raise KeyError(f"no replica of {primary.address}")

    def owner(self, slot: int) -> ClusterNode:
        """The primary that serves `slot`, as the first answering node sees it."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                with node.client() as client:
                    ranges = client.execute_command("CLUSTER SHARDS")
            except redis.RedisError:
                continue
            for shard in ranges:
                shard = _as_dict(shard)
                slots = shard["slots"]
                if any(int(slots[i]) <= slot <= int(slots[i + 1]) for i in range(0, len(slots), 2)):
                    for entry in shard["nodes"]:
                        entry = _as_dict(entry)
                        if entry["role"] == "master" and entry["health"] == "online":
                            return self.node(f"{HOST}:{entry['port']}")
        raise RuntimeError(f"no primary serves slot {slot}")

    def kill_primary_of(self, slot: int) -> ClusterNode:
        """SIGKILL the primary that serves `slot`; its replica will take over."""
        primary = self.owner(slot)
        primary.kill()
        self.killed.append(primary)
        return primary

    def wait_for_failover(self, slot: int, timeout: float = START_TIMEOUT_S) -> ClusterNode:
        """The primary that serves `slot` once a running node does and the cluster is ok."""

        def taken_over() -> bool:
            try:
                return self.owner(slot).running
            except RuntimeError:
                return False

        _wait(taken_over, timeout, f"new primary for slot {slot}")
        self.wait_until_ok(timeout)
        return self.owner(slot)

    def migrate_slot(self, slot: int) -> ClusterNode:
        """Move `slot` to another primary key by key, as `redis-cli --cluster reshard`
        does (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE), while clients may use it;
        returns its new primary."""
        source = self.owner(slot)
        target = next(node for node in self.primaries() if node is not source)
        with source.client() as origin, target.client() as destination:
            origin_id = origin.execute_command("CLUSTER MYID")
            destination_id = destination.execute_command("CLUSTER MYID")
            destination.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", origin_id)
            origin.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", destination_id)
            while keys := origin.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                origin.execute_command("MIGRATE", HOST, target.port, "", 0, 10_000, "KEYS", *keys)
            for node in [target, source, *self.primaries()]:
                with node.client() as client:
                    client.execute_command("CLUSTER SETSLOT", slot, "NODE", destination_id)
        self.wait_until_ok()
        return target

    def restart_killed(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the killed nodes again, empty: each rejoins (its nodes.conf) as a replica
        of the primary that took over."""
        for node in self.killed:
            node.start()
        self.killed.clear()
        self.wait_until_ok(timeout)

    def close(self) -> None:
        for node in self.nodes:
            node.__exit__()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _as_dict(value: Any) -> dict[str, Any]:
    """A RESP2 flat list of name/value pairs (or a RESP3 map) as a dict."""
    if isinstance(value, dict):
        return value
    return {str(value[i]): value[i + 1] for i in range(0, len(value), 2)}


def _start() -> RedisCluster:
    try:
        return RedisCluster().start()
    except (
        RuntimeError,
        OSError,
        TimeoutError,
        redis.RedisError,
        subprocess.SubprocessError,
    ) as exc:
        pytest.fail(f"Redis Cluster is required and could not be started: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One cluster for the whole session, for tests that do not break it."""
    cluster = _start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def fresh_redis_cluster() -> Iterator[RedisCluster]:
    """A cluster of this test's own, for tests that kill, restart or fail over its nodes."""
    cluster = _start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_cluster_store_config(redis_cluster: RedisCluster) -> dict[str, Any]:
    return {
        "cluster": True,
        "nodes": redis_cluster.seeds[:2],
        "key_prefix": f"test-{uuid.uuid4().hex[:12]}",
        "timeout": STORE_TIMEOUT_S,
    }
