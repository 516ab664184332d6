"""What the ScyllaDB store promises beyond the shared contract (LWT on a real CQL server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import acsylla
import grpc
import pytest
from acsylla import errors as cass_errors
from loguru import logger

from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.config.loader import load_settings, validate
from quorum_quest.errors import ConfigError, StoreContended, StoreUnavailable
from quorum_quest.server import running_server
from quorum_quest.stores import Acquisition, LockKey, store_class
from quorum_quest.stores import scylladb as scylladb_module
from quorum_quest.stores.scylladb import STATE_MARKER, ScyllaSettings, ScyllaStore
from tests.backends import free_port
from tests.backends.cassandra import CONTRACT_CLOCK_SKEW_MARGIN
from tests.conftest import make_settings

pytestmark = pytest.mark.scylladb

SHORT_MS = 150
LONG_MS = 30_000
LONGER_MS = 4 * LONG_MS
GRACE_MS = 2000
# For tests that never wait for the end of a grace period: no slow machine outlasts it.
LONG_GRACE_MS = 60_000


def learned(grace_ms: int) -> int:
    """The most an instance refuses for a grace period of `grace_ms` that it learned from
    another instance's marker: the clock skew margin more than the finder."""
    return grace_ms + int(CONTRACT_CLOCK_SKEW_MARGIN * 1000)


def make_store(grace_ms: int = 0, **settings: Any) -> ScyllaStore:
    return store_class("scylladb")(ScyllaSettings.model_validate(settings), grace_ms=grace_ms)


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


async def cql(store: ScyllaStore, query: str) -> None:
    await store._execute("test", acsylla.create_statement(query))


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
        # Long leases for the racers: however slow the loser's answer, the winner's
        # lease has not ended by then, so the loser must have been refused.
        a, b = await asyncio.gather(
            first.acquire(key, f"a-{round_}", LONG_MS),
            second.acquire(key, f"b-{round_}", LONG_MS),
        )
        assert a.acquired != b.acquired, (a, b)
        winner = a if a.acquired else b
        assert winner.token > last
        assert (b if a.acquired else a).holder == winner.holder
        # The next round races for an ended lease again.
        assert await first.release(key, winner.holder)
        last = (await first.acquire(key, f"seed-{round_}", SHORT_MS)).token


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
    await cql(store, f"DROP TABLE {store._table}")
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
    """A session whose every request times out, as a Paxos round can."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def execute(self, statement: object) -> None:
        raise self.error

    async def close(self) -> None:
        return None


class _TimingOutLwt:
    """A conditional statement that times out each time it is run."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def bind(self, values: list[Any], consistency: acsylla.Consistency | None = None) -> None:
        raise self.error


_LWTS = {"marker", "take", "renew", "release", "release_token"}


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
    held = fresh_key()
    assert (await store.acquire(held, "alice", LONG_MS)).acquired
    prepared = store._statements
    store._statements = {
        name: _TimingOutLwt(error) if name in _LWTS else statement
        for name, statement in prepared.items()
    }
    try:
        for call in (
            store.acquire(fresh_key(), "alice", LONG_MS),
            store.acquire(held, "alice", LONG_MS),
            store.keep_alive(held, "alice", LONG_MS),
            store.release(held, "alice"),
        ):
            with pytest.raises(StoreUnavailable, match="outcome is unknown") as caught:
                await call
            assert caught.value.backend == "scylladb"
    finally:
        store._statements = prepared
    real_session, store._session = store._session, _TimingOutSession(error)
    try:
        for call in (
            store.get_leader(fresh_key()),
            store.acquire(fresh_key(), "alice", LONG_MS),
            store.check_state(),
        ):
            # Each begins with a read, which changes nothing: no unknown outcome, no grace.
            with pytest.raises(StoreUnavailable) as caught:
                await call
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


async def test_an_acquire_that_loses_every_race_is_contended_not_a_refusal(
    pair: tuple[ScyllaStore, ScyllaStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before each of bob's compare-and-sets, another instance grants the lock and releases
    it again: each one fails on a row that is free once more, so no holder can be named."""
    first, second = pair
    key = fresh_key()
    assert (await second.acquire(key, "alice", LONG_MS)).acquired
    assert await second.release(key, "alice")
    real_lwt, races = first._lwt, []

    async def lose_the_race(operation: str, statement: str, values: list[Any]) -> Any:
        if statement == "take":
            races.append(f"carol-{len(races)}")
            assert (await second.acquire(key, races[-1], LONG_MS)).acquired
            assert await second.release(key, races[-1])
        return await real_lwt(operation, statement, values)

    monkeypatch.setattr(first, "_lwt", lose_the_race)
    with pytest.raises(StoreContended, match="changed hands") as caught:
        await first.acquire(key, "bob", LONG_MS)
    monkeypatch.undo()
    assert caught.value.backend == "scylladb"
    assert len(races) == scylladb_module._MAX_ROUNDS
    assert await first.get_leader(key) is None  # bob was granted nothing
    assert (await first.acquire(key, "bob", LONG_MS)).acquired  # and may simply ask again


# -- state loss and the grace period ---------------------------------------------------


@contextmanager
def losses_logged() -> Iterator[list[str]]:
    """The WARNINGs about a loss of lock state logged meanwhile."""
    messages: list[str] = []
    sink = logger.add(
        lambda message: messages.append(message.record["message"]),
        level="WARNING",
        filter=lambda record: "lock state lost" in record["message"],
    )
    try:
        yield messages
    finally:
        logger.remove(sink)


def in_grace(answer: Acquisition, grace_ms: int = GRACE_MS) -> bool:
    return answer == Acquisition(False, "", 0, answer.ttl_ms, grace=True) and (
        0 < answer.ttl_ms <= grace_ms
    )


async def test_a_new_table_refuses_grants_for_the_grace_period_then_tokens_go_on_rising(
    scylladb_store_config: dict[str, Any],
) -> None:
    key = fresh_key()
    store = make_store(**scylladb_store_config)
    await store.start()
    before = (await store.acquire(key, "alice", LONG_MS)).token
    await cql(store, f"DROP TABLE {store._table}")
    await store.close()
    store = make_store(grace_ms=GRACE_MS, **scylladb_store_config)
    with losses_logged() as losses:
        await store.start()  # creates the table again, and finds no state marker in it
    try:
        assert len(losses) == 1
        assert losses[0].startswith("scylladb: lock state lost")
        assert f"refusing grants, refreshes and keep-alives for {GRACE_MS} ms" in losses[0]
        marker = await raw_row(store, STATE_MARKER)
        assert marker is not None and marker["expires_at"] - marker["fencing_token"] == GRACE_MS
        refused = await store.acquire(key, "bob", LONG_MS)
        assert in_grace(refused), refused
        assert await store.get_leader(key) is None
        await asyncio.sleep(refused.ttl_ms / 1000)
        granted = await store.acquire(key, "bob", LONG_MS)
        assert granted.acquired and granted.token > before
    finally:
        await store.close()


async def test_a_truncated_table_refuses_the_old_holder_and_everyone_until_the_grace_ends(
    pair: tuple[ScyllaStore, ScyllaStore],
) -> None:
    first, second = pair
    for store in pair:
        store.grace_ms = GRACE_MS  # as a reload would set it: for the next detection
    key = fresh_key()
    alice = await first.acquire(key, "alice", LONG_MS)
    await cql(first, f"TRUNCATE {first._table}")
    with losses_logged() as losses:
        assert not (await first.keep_alive(key, "alice", LONG_MS)).renewed  # its row is gone
        assert in_grace(await second.acquire(key, "bob", LONG_MS))  # the first grant detects
        # The other instance learns it from the marker on its own first-grant path.
        assert in_grace(await first.acquire(key, "carol", LONG_MS), learned(GRACE_MS))
        assert in_grace(await first.acquire(key, "alice", LONG_MS), learned(GRACE_MS))
        assert not (await first.keep_alive(key, "alice", LONG_MS)).renewed
        assert 0 < await first.check_state() <= learned(GRACE_MS)
    assert len(losses) == 1
    await asyncio.sleep(await first.check_state() / 1000)  # the learner ends last
    granted = await first.acquire(key, "bob", LONG_MS)
    assert granted.acquired and granted.token > alice.token


async def test_in_the_grace_period_every_grant_and_renewal_is_refused_release_works(
    pair: tuple[ScyllaStore, ScyllaStore],
) -> None:
    first, second = pair
    held, expired, new = fresh_key(), fresh_key(), fresh_key()
    alice = await first.acquire(held, "alice", LONG_MS)
    await first.acquire(expired, "dave", SHORT_MS)
    await expire()
    # Only the marker is lost (as when its replicas lost it): the next check finds out.
    await cql(
        first,
        f"DELETE FROM {first._table} WHERE service = '' AND domain = '{STATE_MARKER.domain}' "
        "IF EXISTS",
    )
    second.grace_ms = LONG_GRACE_MS
    with losses_logged() as losses:
        assert 0 < await second.check_state() <= LONG_GRACE_MS
    assert len(losses) == 1
    assert 0 < await first.check_state() <= learned(LONG_GRACE_MS)  # recorded: both agree
    for store in pair:
        refresh = await store.acquire(held, "alice", LONG_MS)
        takeover = await store.acquire(expired, "erin", LONG_MS)
        first_grant = await store.acquire(new, "erin", LONG_MS)
        for answer in (refresh, takeover, first_grant):
            assert in_grace(answer, learned(LONG_GRACE_MS)), answer
        assert not (await store.keep_alive(held, "alice", LONG_MS)).renewed
        assert [r.renewed for r in await store.keep_alive_many([held], "alice", LONG_MS)] == [False]
    leader = await second.get_leader(held)
    assert leader is not None and (leader.client_id, leader.token) == ("alice", alice.token)
    assert await second.release(held, "alice", alice.token)
    assert await second.get_leader(held) is None


async def test_without_a_grace_period_a_loss_is_logged_and_nothing_refused(
    scylladb_store_config: dict[str, Any],
) -> None:
    store = make_store(**scylladb_store_config)
    with losses_logged() as losses:
        await store.start()
    try:
        assert len(losses) == 1 and "the grace period is off" in losses[0]
        assert await store.check_state() == 0
        key = fresh_key()
        alice = await store.acquire(key, "alice", LONG_MS)
        assert alice.acquired
        await cql(store, f"TRUNCATE {store._table}")
        with losses_logged() as losses:
            bob = await store.acquire(key, "bob", LONG_MS)
        assert len(losses) == 1
        assert bob.acquired and bob.token > alice.token
    finally:
        await store.close()


async def test_check_state_answers_what_is_left_of_the_grace_period(
    scylladb_store_config: dict[str, Any],
) -> None:
    store = make_store(grace_ms=GRACE_MS, **scylladb_store_config)
    with losses_logged() as losses:
        await store.start()
        try:
            left = await store.check_state()
            assert 0 < left <= GRACE_MS
            await asyncio.sleep(0.5)
            later = await store.check_state()
            assert later <= left - 450
            refused = await store.acquire(fresh_key(), "alice", LONG_MS)
            assert in_grace(refused) and refused.ttl_ms <= later
            await asyncio.sleep(later / 1000)
            assert await store.check_state() == 0
            assert (await store.acquire(fresh_key(), "alice", LONG_MS)).acquired
        finally:
            await store.close()
    assert len(losses) == 1  # found once; the checks after it read the marker


async def test_a_second_instance_sees_the_grace_period_the_first_recorded(
    scylladb_store_config: dict[str, Any],
) -> None:
    first = make_store(grace_ms=LONG_GRACE_MS, **scylladb_store_config)
    second = make_store(grace_ms=0, **scylladb_store_config)
    with losses_logged() as losses:
        await first.start()
        await second.start()
    try:
        assert len(losses) == 1  # only the instance whose marker was written
        assert 0 < await second.check_state() <= learned(LONG_GRACE_MS)
        assert in_grace(await second.acquire(fresh_key(), "bob", LONG_MS), learned(LONG_GRACE_MS))
    finally:
        await first.close()
        await second.close()


async def test_an_instance_whose_clock_runs_ahead_keeps_the_grace_period_for_the_margin(
    scylladb_store_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker's grace_until is on the clock of the instance that found the loss. An
    instance whose clock runs ahead of it (by less than clock_skew_margin) would see the
    grace period end early by the skew: it keeps it the margin longer, as a foreign lease."""
    margin_s, skew_s = 120.0, 90.0  # a skew past the whole grace period
    config = scylladb_store_config | {"clock_skew_margin": margin_s}
    finder, ahead = make_store(LONG_GRACE_MS, **config), make_store(**config)
    await finder.start()
    try:
        assert 0 < await finder.check_state() <= LONG_GRACE_MS
        real_time_ns = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + int(skew_s * 1e9))
        await ahead.start()
        left = await ahead.check_state()
        refused = await ahead.acquire(fresh_key(), "bob", LONG_MS)
        monkeypatch.undo()
        most = LONG_GRACE_MS + int((margin_s - skew_s) * 1000)
        assert 0 < left <= most
        assert in_grace(refused, most), refused
    finally:
        await finder.close()
        await ahead.close()


async def test_a_renewal_delivered_late_never_shortens_the_lease(
    pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keep-alive computed on an older clock reading (held up on its way to the
    cluster) arrives after a later one: the lease keeps the later end."""
    first, second = pair
    key = fresh_key()
    granted = await first.acquire(key, "alice", LONG_MS)
    assert (await second.keep_alive(key, "alice", LONG_MS)).renewed
    real_now_ms = scylladb_module._now_ms
    monkeypatch.setattr(scylladb_module, "_now_ms", lambda: real_now_ms() - 10_000)
    late = await first.keep_alive(key, "alice", LONG_MS)
    refresh = await first.acquire(key, "alice", LONG_MS)
    monkeypatch.undo()
    assert late.renewed and late.token == granted.token
    assert refresh.acquired and refresh.refreshed and refresh.token == granted.token
    holder = await second.get_leader(key)
    assert holder is not None and holder.remaining_ms > LONG_MS - 5_000


# -- idle rows expire (a CQL TTL on every cell a lease writes) ---------------------------

RETENTION_S = 600


async def cell_ttls(store: ScyllaStore, key: LockKey) -> dict[str, Any] | None:
    """The row's lease end and the TTL left (seconds) of each of its cells."""
    statement = acsylla.create_statement(
        "SELECT expires_at, TTL(holder) AS holder, TTL(expires_at) AS lease, "
        f"TTL(fencing_token) AS counter FROM {store._table} WHERE service = ? AND domain = ?",
        parameters=2,
    )
    row = (await store._execute("test", statement, [key.service, key.domain])).first()
    return row.as_dict() if row is not None else None


async def test_every_lease_write_gives_all_cells_one_ttl_past_the_lease_and_the_marker_none(
    scylladb_store_config: dict[str, Any],
) -> None:
    """Each cell lives past the lease's end plus the margin, plus the retention; all three
    alike, so the token never expires under a live lease and the row goes all at once."""
    margin_s = 2.5  # not whole seconds: the rounding up shows
    config = scylladb_store_config | {"idle_retention": RETENTION_S, "clock_skew_margin": margin_s}
    store, other = make_store(**config), make_store(**config)
    await store.start()
    await other.start()
    key = fresh_key()

    async def check(what: str, ttl_ms: int, retention_s: int = RETENTION_S) -> int:
        cells = await cell_ttls(store, key)
        now_ms = scylladb_module._now_ms()
        assert cells is not None, what
        assert cells["holder"] == cells["lease"] == cells["counter"], (what, cells)
        # Past the lease's end plus the margin, plus the retention; at most what was written.
        assert cells["counter"] >= (cells["expires_at"] + margin_s * 1000 - now_ms) / 1000 + (
            retention_s
        ), (what, cells)
        assert cells["counter"] <= -(-(ttl_ms + margin_s * 1000) // 1000) + 1 + retention_s
        return cells["counter"]

    try:
        writes = {
            "first grant": (lambda: store.acquire(key, "alice", LONG_MS), LONG_MS),
            "refresh": (lambda: store.acquire(key, "alice", 2 * LONG_MS), 2 * LONG_MS),
            "keep-alive": (lambda: store.keep_alive(key, "alice", 3 * LONG_MS), 3 * LONG_MS),
            "keep-alive elsewhere": (
                lambda: other.keep_alive(key, "alice", 4 * LONG_MS),
                4 * LONG_MS,
            ),
        }
        for what, (write, ttl_ms) in writes.items():
            assert (await write()).token, what
            await check(what, ttl_ms)
        before = (await cell_ttls(store, key))["counter"]
        assert await store.release(key, "alice")
        released = await cell_ttls(store, key)
        assert released["holder"] is None and released["lease"] is None  # deleted cells
        assert before - 2 <= released["counter"] <= before  # the last lease's TTL, untouched
        assert (await other.acquire(key, "bob", SHORT_MS)).acquired  # a take of the row
        await check("take", SHORT_MS)
        await asyncio.sleep((SHORT_MS + margin_s * 1000) / 1000 + 0.15)
        assert (await store.acquire(key, "carol", LONG_MS)).acquired  # takeover, past margin
        await check("takeover", LONG_MS)
        store.reconfigure(store.settings.model_copy(update={"idle_retention": 60}))
        assert (await store.keep_alive(key, "carol", LONG_MS)).renewed
        await check("keep-alive after a reload", LONG_MS, 60)  # applied in place
        marker = await cell_ttls(store, STATE_MARKER)
        assert marker is not None
        assert (marker["holder"], marker["lease"], marker["counter"]) == (None, None, None)
    finally:
        await store.close()
        await other.close()


async def test_an_idle_lock_row_expires_and_the_next_grant_takes_a_larger_token(
    scylladb_store_config: dict[str, Any],
) -> None:
    store = make_store(**scylladb_store_config, idle_retention=1)
    await store.start()
    released, expired = fresh_key(), fresh_key()
    tokens: list[int] = []
    try:
        for cycle in range(20):
            granted = await store.acquire(released, f"client-{cycle % 3}", SHORT_MS)
            assert granted.acquired
            tokens.append(granted.token)
            assert await store.release(released, f"client-{cycle % 3}")
        assert (await store.acquire(expired, "alice", SHORT_MS)).acquired
        # Gone a few seconds after the leases ended: wait without judging how long it takes.
        patience = time.monotonic() + 120
        while await raw_row(store, released) or await raw_row(store, expired):
            assert time.monotonic() < patience, "the idle rows did not expire"
            await asyncio.sleep(0.5)
        assert await raw_row(store, STATE_MARKER) is not None  # the marker never expires
        after = await store.acquire(released, "bob", LONG_MS)
        assert after.acquired and after.token > max(tokens)
        assert all(a < b for a, b in zip(tokens, tokens[1:], strict=False)), tokens
        assert (await store.acquire(expired, "bob", LONG_MS)).acquired
    finally:
        await store.close()


async def test_a_live_lease_outlives_the_ttl_its_grant_wrote(
    scylladb_store_config: dict[str, Any],
) -> None:
    """A renewal writes every cell again: the token must not expire with its grant's TTL
    while the renewed lease lives on."""
    store = make_store(**scylladb_store_config, idle_retention=1)
    await store.start()
    key = fresh_key()
    try:
        grant_ms = 5_000  # time enough to renew it on a loaded machine
        granted = await store.acquire(key, "alice", grant_ms)
        granted_at = time.monotonic()
        assert (await store.keep_alive(key, "alice", LONG_MS)).renewed
        grant_cells_s = store._cells_ttl_s(grant_ms)
        await asyncio.sleep(max(0.0, granted_at + grant_cells_s + 1.5 - time.monotonic()))
        row = await raw_row(store, key)
        assert row is not None and row["fencing_token"] == granted.token
        holder = await store.get_leader(key)
        assert holder is not None and (holder.client_id, holder.token) == ("alice", granted.token)
        assert not (await store.acquire(key, "bob", LONG_MS)).acquired
        assert (await store.keep_alive(key, "alice", LONG_MS)).token == granted.token
    finally:
        await store.close()


async def test_a_keep_alive_with_a_stale_token_renews_the_callers_current_lease(pair) -> None:
    """This instance remembers the token it granted; the caller's lease was granted again
    through another instance since: the renewal finds the new token and renews that lease."""
    first, second = pair
    key = fresh_key()
    old = await first.acquire(key, "alice", LONG_MS)
    assert await second.release(key, "alice")
    new = await second.acquire(key, "alice", LONG_MS)
    assert new.token > old.token
    renewal = await first.keep_alive(key, "alice", LONGER_MS)
    assert renewal.renewed and renewal.token == new.token
    holder = await second.get_leader(key)
    assert holder is not None and holder.token == new.token and holder.remaining_ms > LONG_MS
    assert await first.release(key, "alice")
    assert not (await first.keep_alive(key, "alice", LONG_MS)).renewed  # never revived


async def test_a_row_left_with_only_its_row_marker_is_granted(
    scylladb_store_config: dict[str, Any],
) -> None:
    """What a row of an earlier version (its first grant was an INSERT, writing a row marker
    without TTL) reads as once its cells expired: a row of nulls. It is a lock without state."""
    store = make_store(**scylladb_store_config)
    await store.start()
    key = fresh_key()
    try:
        await cql(
            store,
            f"INSERT INTO {store._table} (service, domain) VALUES ('{key.service}', "
            f"'{key.domain}') IF NOT EXISTS",
        )
        assert await raw_row(store, key) == {
            "service": key.service,
            "domain": key.domain,
            "holder": None,
            "expires_at": None,
            "fencing_token": None,
        }
        granted = await store.acquire(key, "alice", LONG_MS)
        assert granted.acquired and granted.token > 0
        assert (await store.get_leader(key)).token == granted.token
    finally:
        await store.close()


async def test_the_state_marker_never_expires_even_under_a_default_ttl(
    scylladb_store_config: dict[str, Any],
) -> None:
    store = make_store(**scylladb_store_config)
    await store.start()
    try:
        await cql(store, f"ALTER TABLE {store._table} WITH default_time_to_live = 3600")
        await cql(
            store,
            f"DELETE FROM {store._table} WHERE service = '' AND domain = "
            f"'{STATE_MARKER.domain}' IF EXISTS",
        )
        with losses_logged() as losses:
            assert await store.check_state() == 0
        assert len(losses) == 1
        marker = await cell_ttls(store, STATE_MARKER)
        assert marker is not None
        assert (marker["holder"], marker["lease"], marker["counter"]) == (None, None, None)
        key = fresh_key()
        assert (await store.acquire(key, "alice", LONG_MS)).acquired
        assert (await cell_ttls(store, key))["counter"] > 86_000  # the lease's TTL, not 3600
    finally:
        await store.close()


async def test_idle_retention_is_checked_and_read_from_the_environment() -> None:
    assert ScyllaSettings().idle_retention == 86_400
    for bad in (0, -5, scylladb_module.MAX_IDLE_RETENTION_S + 1):
        error = store_error({"idle_retention": bad})
        assert error.path == "store.idle_retention"
    settings = load_settings(
        None, {"QUORUMQUEST_BACKEND_TYPE": "scylladb", "QUORUMQUEST_STORE_IDLE_RETENTION": "7200"}
    )
    assert settings.store_settings().idle_retention == 7200
    store = make_store()
    assert store.reconfigure(store.settings.model_copy(update={"idle_retention": 60}))
    assert store.settings.idle_retention == 60
    # A lease so long that its TTL would pass CQL's 20-year maximum is given none.
    assert store._cells_ttl_s(scylladb_module.MAX_CQL_TTL_S * 1000) == 0
    assert store._cells_ttl_s(1) == 2 + 1 + 60  # 1 ms + the 1 s margin, rounded up; + 1 s
