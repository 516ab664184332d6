"""The backend processes that fault tests kill, restart, pause and fail over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import acsylla
import pytest
import redis
from redis.asyncio.sentinel import Sentinel

from tests.backends.cassandra import CassandraProcess
from tests.backends.dynamodb import EmulatorProcess, dynalite_process, moto_process
from tests.backends.redis import RedisProcess
from tests.backends.sentinel import SentinelTopology


@pytest.mark.redis
@pytest.mark.parametrize(("persistent", "after_restart"), [(False, None), (True, b"kept")])
def test_redis_restart_keeps_the_port_and_the_data_only_when_persistent(
    persistent: bool, after_restart: bytes | None
) -> None:
    with RedisProcess(persistent=persistent) as server:
        with redis.Redis(port=server.port) as client:
            client.set("key", "kept")
        port = server.port
        server.restart()
        assert server.port == port
        with redis.Redis(port=server.port) as client:
            assert client.get("key") == after_restart


@pytest.mark.redis
def test_a_paused_redis_answers_only_once_resumed() -> None:
    with RedisProcess() as server:
        server.pause()
        assert not server.answers()
        server.resume()
        assert server.answers()


@pytest.mark.scylladb
async def test_a_durable_cassandra_node_keeps_a_row_through_kill_and_restart() -> None:
    async def execute(node: CassandraProcess, *queries: str) -> acsylla.Result:
        cluster = acsylla.create_cluster(["127.0.0.1"], port=node.cql_port, request_timeout=20)
        session = await cluster.create_session()
        try:
            for query in queries:
                result = await session.execute(acsylla.create_statement(query))
        finally:
            await session.close()
        return result

    # Started and restarted from this (the main) thread: the node dies with its starter.
    with CassandraProcess(heap="512M", durable=True) as node:
        await execute(
            node,
            "CREATE KEYSPACE qq_restart WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
            "CREATE TABLE qq_restart.kv (k text PRIMARY KEY, v text)",
            "INSERT INTO qq_restart.kv (k, v) VALUES ('key', 'kept')",
        )
        node.restart()
        result = await execute(node, "SELECT v FROM qq_restart.kv WHERE k = 'key'")
        assert result.first().as_dict() == {"v": "kept"}


@pytest.mark.dynamodb
@pytest.mark.parametrize("make_process", [moto_process, dynalite_process], ids=["moto", "dynalite"])
def test_an_emulator_restart_keeps_the_port_and_loses_the_tables(
    make_process: Callable[[], EmulatorProcess],
) -> None:
    with make_process() as emulator:
        emulator.endpoint.admin().create_table(
            TableName="qq-restart",
            KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        port = emulator.port
        emulator.restart()
        assert emulator.port == port
        assert emulator.endpoint.admin().list_tables()["TableNames"] == []


@pytest.mark.redis
async def test_sentinel_clients_follow_a_failover_after_a_kill_and_a_graceful_one(
    sentinel_topology: SentinelTopology,
) -> None:
    topology = sentinel_topology
    sentinel = Sentinel(topology.sentinel_endpoints, socket_timeout=1)
    async with sentinel.master_for(topology.master_name, socket_timeout=1) as primary:

        async def serving() -> str:
            return f"127.0.0.1:{(await primary.info('server'))['tcp_port']}"

        await primary.set("key", "kept")
        assert await primary.wait(1, 2000) == 1  # the replica has it
        assert await serving() == topology.primary_address()

        killed = topology.kill_primary()
        promoted = await asyncio.to_thread(topology.wait_for_failover, 30)
        assert promoted != killed
        assert await serving() == promoted  # reconnected through the sentinels
        assert await primary.get("key") == b"kept"

        await asyncio.to_thread(topology.restart_killed)
        topology.failover()
        assert await asyncio.to_thread(topology.wait_for_failover, 30) == killed
        host, port = await sentinel.discover_master(topology.master_name)
        assert f"{host}:{port}" == killed
        # Open connections stay on the demoted primary, which answers until it is a replica.
        await primary.connection_pool.disconnect()
        assert await serving() == killed
