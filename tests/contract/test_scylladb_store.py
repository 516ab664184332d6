"""What the ScyllaDB store promises beyond the shared contract (LWT on a real CQL server)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import acsylla
import grpc
import pytest
from acsylla import errors as cass_errors

from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.config.loader import validate
from quorum_quest.errors import ConfigError, StoreUnavailable
from quorum_quest.server import running_server
from quorum_quest.stores import LockKey, store_class
from quorum_quest.stores.scylladb import ScyllaSettings, ScyllaStore
from tests.backends import free_port
from tests.conftest import make_settings

pytestmark = pytest.mark.scylladb

SHORT_MS = 150
LONG_MS = 30_000


def make_store(**settings: Any) -> ScyllaStore:
    return store_class("scylladb")(ScyllaSettings.model_validate(settings))


@pytest.fixture
async def pair(scylladb_store_config: dict[str, Any]) -> AsyncIterator[tuple[ScyllaStore, ...]]:
    """Two service instances on one table: two store objects, two driver sessions."""
    first, second = make_store(**scylladb_store_config), make_store(**scylladb_store_config)
    await first.start()
    await second.start()
    yield first, second
    await first.close()
    await second.close()


def fresh_key() -> LockKey:
    return LockKey("svc-" + uuid.uuid4().hex[:8], "dom")


async def expire(ttl_ms: int = SHORT_MS) -> None:
    await asyncio.sleep(ttl_ms / 1000 + 0.12)  # the tests' clock_skew_margin is 0.05 s


async def raw_row(store: ScyllaStore, key: LockKey) -> dict[str, Any] | None:
    statement = acsylla.create_statement(
        f"SELECT * FROM {store._table} WHERE service = ? AND domain = ?", parameters=2
    )
    result = await store._execute("test", statement, [key.service, key.domain])
    row = result.first()
    return row.as_dict() if row is not None else None


async def test_two_instances_racing_on_one_lock_never_both_win(pair) -> None:
    first, second = pair
    for _ in range(15):
        key = fresh_key()
        results = await asyncio.gather(
            *(
                store.acquire(key, f"{name}-{n}", LONG_MS)
                for n in range(3)
                for name, store in (("a", first), ("b", second))
            )
        )
        winners = [result for result in results if result.acquired]
        assert len(winners) == 1
        assert {result.holder for result in results} == {winners[0].holder}


async def test_two_instances_racing_for_an_expired_lock_never_both_win(pair) -> None:
    first, second = pair
    key = fresh_key()
    last = (await first.acquire(key, "seed", SHORT_MS)).token
    for round_ in range(6):
        await expire()
        a, b = await asyncio.gather(
            first.acquire(key, f"a-{round_}", SHORT_MS),
            second.acquire(key, f"b-{round_}", SHORT_MS),
        )
        assert a.acquired != b.acquired, (a, b)
        winner = a if a.acquired else b
        assert winner.token > last
        assert (b if a.acquired else a).holder == winner.holder
        last = winner.token


async def test_keep_alive_by_non_holder_and_expired_holder_is_refused(pair) -> None:
    first, second = pair
    key = fresh_key()
    granted = await first.acquire(key, "alice", SHORT_MS)
    assert not (await second.keep_alive(key, "bob", LONG_MS)).renewed
    await expire()
    assert not (await second.keep_alive(key, "alice", LONG_MS)).renewed
    assert not (await first.keep_alive(key, "alice", LONG_MS)).renewed
    assert await first.get_leader(key) is None
    row = await raw_row(first, key)
    assert row is not None and row["fencing_token"] == granted.token


async def test_keep_alive_by_expired_holder_answers_minus_one_second(
    scylladb_store_config: dict[str, Any],
) -> None:
    settings = make_settings("scylladb", scylladb_store_config)
    async with running_server(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = LeaderElectionStub(channel)
            lock = {"service": "svc", "domain": uuid.uuid4().hex, "client_id": "alice"}
            granted = await stub.try_acquire_lock(pb.TryAcquireLockRequest(**lock, ttl_ms=SHORT_MS))
            assert granted.is_leader
            await expire()
            answer = await stub.keep_alive(pb.KeepAliveRequest(**lock, ttl=5))
            assert answer.lease_length == timedelta(seconds=-1)


async def test_release_by_non_holder_changes_nothing(pair) -> None:
    first, second = pair
    key = fresh_key()
    await first.acquire(key, "alice", LONG_MS)
    before = await raw_row(first, key)
    assert await second.release(key, "bob") is False
    assert await raw_row(second, key) == before


async def test_tokens_strictly_increase_over_100_acquire_expire_release_cycles(pair) -> None:
    first, second = pair
    key = fresh_key()
    tokens = []
    for cycle in range(100):
        store = (first, second)[cycle % 2]
        client = f"client-{cycle % 3}"
        expiring = cycle % 4 == 3
        result = await store.acquire(key, client, 60 if expiring else LONG_MS)
        assert result.acquired, (cycle, result)
        tokens.append(result.token)
        if expiring:
            await asyncio.sleep(0.06 + 0.07)  # lease, margin, and a little more
        else:
            assert await (second, first)[cycle % 2].release(key, client)
    assert all(a < b for a, b in zip(tokens, tokens[1:], strict=False)), tokens


async def test_tokens_keep_rising_after_the_table_is_dropped(
    scylladb_store_config: dict[str, Any],
) -> None:
    store = make_store(**scylladb_store_config)
    await store.start()
    key = fresh_key()
    before = (await store.acquire(key, "alice", LONG_MS)).token
    await store._execute("test", acsylla.create_statement(f"DROP TABLE {store._table}"))
    await store.close()
    store = make_store(**scylladb_store_config)
    await store.start()
    after = (await store.acquire(key, "bob", LONG_MS)).token
    await store.close()
    assert after > before


async def test_several_endpoints_are_all_contact_points(
    cql_endpoint: str, scylladb_store_config: dict[str, Any]
) -> None:
    port = cql_endpoint.rsplit(":", 1)[1]
    endpoints = [f"localhost:{port}", cql_endpoint]
    store = make_store(
        **{**scylladb_store_config, "endpoints": endpoints},
        replication={"class": "SimpleStrategy", "replication_factor": 1},
    )
    assert store.settings.contact_points() == (["localhost", "127.0.0.1"], int(port))
    await store.start()
    try:
        assert (await store.acquire(fresh_key(), "alice", LONG_MS)).acquired
    finally:
        await store.close()


def test_endpoints_from_the_environment_are_comma_separated() -> None:
    settings = ScyllaSettings(
        endpoints="db1:9142, db2:9142",
        replication={"class": "SimpleStrategy", "replication_factor": 3},
    )
    assert settings.contact_points() == (["db1", "db2"], 9142)
    assert ScyllaSettings(endpoints=["[::1]:9043"]).contact_points() == (["::1"], 9043)
    assert ScyllaSettings(host="db", port=9999).contact_points() == (["db"], 9999)


def store_error(store: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        validate({"backend": {"type": "scylla"}, "store": store})
    return caught.value


@pytest.mark.parametrize(
    ("store", "path", "reason"),
    [
        ({"keyspace": "quorum-quest"}, "store.keyspace", "not a valid name"),
        ({"keyspace": 'a"; DROP KEYSPACE x; --'}, "store.keyspace", "not a valid name"),
        ({"table": "1services"}, "store.table", "starting with a letter"),
        ({"table": "t" * 49}, "store.table", "1 to 48"),
        ({"table": ""}, "store.table", "not a valid name"),
        ({"consistency": "CONSISTENCY_SERIAL"}, "store.consistency", "unknown consistency"),
        ({"consistency": "MOST"}, "store.consistency", "LOCAL_QUORUM"),
        ({"serial_consistency": "QUORUM"}, "store.serial_consistency", "LOCAL_SERIAL"),
        ({"endpoints": ["a:9042", "b:9043"]}, "store.endpoints", "one port"),
        ({"endpoints": ["a:9043", "b"]}, "store.endpoints", "one port"),
        ({"endpoints": ["a:x"]}, "store.endpoints", "no valid port"),
        ({"endpoints": ["a:9042", "b:9042"]}, "store.replication", "NetworkTopologyStrategy"),
        ({"replication": {"class": "Everywhere"}}, "store.replication", "'class'"),
        (
            {"replication": {"class": "NetworkTopologyStrategy"}},
            "store.replication",
            "per datacenter",
        ),
        (
            {"replication": {"class": "NetworkTopologyStrategy", "dc1": 0}},
            "store.replication",
            "positive",
        ),
        ({"password": "secret"}, "store.password", "username"),
        ({"hosts": ["a"]}, "store.hosts", "unknown key"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(
    store: dict[str, Any], path: str, reason: str
) -> None:
    error = store_error(store)
    assert error.path == path
    assert reason in error.reason


def test_the_seed_readme_settings_are_accepted() -> None:
    settings = validate(
        {
            "backend": {"type": "scylladb"},
            "store": {
                "host": "127.0.0.1",
                "port": 9042,
                "keyspace": "quorumquest",
                "table": "services",
                "ttl": 15,
                "consistency": "CONSISTENCY_QUORUM",
                "endpoints": ["localhost:9042"],
            },
        }
    ).store_settings()
    assert isinstance(settings, ScyllaSettings)
    assert (settings.consistency, settings.serial_consistency) == ("QUORUM", "SERIAL")
    assert settings.contact_points() == (["localhost"], 9042)


@pytest.mark.parametrize(
    ("field", "given", "parsed"),
    [
        ("consistency", "CONSISTENCY_QUORUM", "QUORUM"),
        ("consistency", "CONSISTENCY_LOCAL_QUORUM", "LOCAL_QUORUM"),
        ("consistency", "local_one", "LOCAL_ONE"),
        ("consistency", "ALL", "ALL"),
        ("serial_consistency", "LOCAL_SERIAL", "LOCAL_SERIAL"),
        ("serial_consistency", "CONSISTENCY_SERIAL", "SERIAL"),
    ],
)
def test_consistency_names_are_parsed(field: str, given: str, parsed: str) -> None:
    settings = ScyllaSettings.model_validate({field: given})
    assert getattr(settings, field) == parsed
    assert getattr(acsylla.Consistency, parsed)  # a level the driver knows


def test_replication_is_written_as_a_cql_map() -> None:
    settings = ScyllaSettings(
        replication={"class": "NetworkTopologyStrategy", "eu-1": 3, "us'2": "3"}
    )
    assert settings.replication_cql() == (
        "{'class': 'NetworkTopologyStrategy', 'eu-1': '3', 'us''2': '3'}"
    )
    assert (
        ScyllaSettings().replication_cql()
        == "{'class': 'SimpleStrategy', 'replication_factor': '1'}"
    )


async def test_unreachable_cluster_is_store_unavailable_with_a_clear_message() -> None:
    port = free_port()
    store = make_store(endpoints=[f"127.0.0.1:{port}"], connect_timeout=1.0)
    with pytest.raises(StoreUnavailable) as caught:
        await store.start()
    assert caught.value.backend == "scylladb"
    assert f"cannot connect to 127.0.0.1:{port}" in str(caught.value)
    with pytest.raises(StoreUnavailable, match="not started"):
        await store.acquire(fresh_key(), "alice", LONG_MS)
    await store.close()


async def test_missing_table_without_create_schema_is_a_clear_error(
    scylladb_store_config: dict[str, Any],
) -> None:
    store = make_store(**{**scylladb_store_config, "create_schema": False, "table": "absent"})
    with pytest.raises(StoreUnavailable, match="create_schema is off") as caught:
        await store.start()
    assert "absent" in str(caught.value)


class _TimingOutSession:
    """A session whose every request times out as a Paxos round can."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def execute(self, statement: object) -> None:
        raise self.error

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(
    "error",
    [
        cass_errors.CassErrorServerWriteTimeout("Operation timed out - received only 0 responses."),
        cass_errors.CassErrorLibRequestTimedOut("Request timed out"),
    ],
)
async def test_lwt_timeout_is_unavailable_with_an_unknown_outcome(
    scylladb_store_config: dict[str, Any], error: Exception
) -> None:
    store = make_store(**scylladb_store_config)
    await store.start()
    real_session, store._session = store._session, _TimingOutSession(error)
    try:
        for call in (
            store.acquire(fresh_key(), "alice", LONG_MS),
            store.keep_alive(fresh_key(), "alice", LONG_MS),
            store.release(fresh_key(), "alice"),
        ):
            with pytest.raises(StoreUnavailable, match="outcome is unknown") as caught:
                await call
            assert caught.value.backend == "scylladb"
        with pytest.raises(StoreUnavailable) as caught:
            await store.get_leader(fresh_key())  # a read changes nothing: no unknown outcome
        assert "unknown" not in str(caught.value)
    finally:
        store._session = real_session
        await store.close()


async def test_acquire_after_an_unknown_outcome_tells_the_truth(pair) -> None:
    # What the docs tell a caller to do after a timed-out acquire: ask again.
    first, second = pair
    key = fresh_key()
    granted = await first.acquire(key, "alice", LONG_MS)  # pretend its answer was lost
    again = await second.acquire(key, "alice", LONG_MS)
    assert again.acquired and again.refreshed and again.token == granted.token
