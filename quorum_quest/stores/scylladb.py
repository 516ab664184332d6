"""The ScyllaDB store (also Apache Cassandra): every lock change one lightweight transaction.

One row per lock, in one partition of its own:

    CREATE TABLE "<keyspace>"."<table>" (
        service       text,
        domain        text,
        holder        text,     -- client_id of the holder; null while the lock is free
        expires_at    bigint,   -- end of the lease, Unix epoch milliseconds; null while free
        fencing_token bigint,   -- the last token issued for this lock
        PRIMARY KEY ((service, domain)))

service and domain are two key columns, so no two pairs can collide. Every write is a
conditional statement (LWT): Paxos at `serial_consistency` decides it, the commit goes
out at `consistency`, and the answer carries `[applied]` and, when not applied, the
current values of the row. Each decision is taken by the server on the row as it is at
that moment; no write ever depends on an earlier plain read:

    read     SELECT holder, expires_at, fencing_token at `serial_consistency`
    take     UPDATE USING TTL <cells> SET holder, expires_at, fencing_token
             IF holder = <seen> AND expires_at = <seen> AND fencing_token = <seen>
    renew    UPDATE USING TTL <cells> SET holder, expires_at = <end>, fencing_token
             IF holder = <me> AND fencing_token = <token> AND <now> < expires_at < <end>
    release  DELETE holder, expires_at IF holder = <me> [AND fencing_token = <token>]
             AND expires_at > <now>
    marker   INSERT (service, domain, holder, expires_at, fencing_token) IF NOT EXISTS
             USING TTL 0 (the state marker only)

`acquire` reads the row (a serial read is a Paxos round, as a refused LWT is). A live
lease of someone else is a refusal; the caller's own live lease is renewed (same
token); a free or expired lock is taken with a compare-and-set on the exact row it saw,
so a change in between (another grant, a renewal) fails the condition, whose answer is
the new row to decide on again; an acquire whose every round lost so raises
`StoreContended` (nothing was granted, and no holder is known to name). A row without a
token means the lock's first grant, a lock idle long enough for its row to expire, or a
table that lost its rows: the state marker is checked (below), then `take` grants the
lock on the empty row (a condition `= null` holds on a row that does not exist).
`keep_alive` is `renew`, which needs the lease's token: the token this instance last
granted or renewed for the caller, else a serial read first. A refusal that shows the
caller holding the lock with another token (granted through another instance) renews
that lease. `release` is `release` (a token past `bigint` is no lease's: False, without
a statement); `get_leader` reads at the serial consistency.

Why no CQL TTL holds the lease: TTLs count whole seconds, and a cell's expiry is judged on
each replica's clock at second granularity, so a 1 s TTL can end after a few
milliseconds. The lease end is therefore `expires_at`, in milliseconds, and it is judged
on the service instance's wall clock (`<now>`), as in the DynamoDB store: instances
sharing a table need synchronised clocks, and an instance takes over a foreign lease only
`clock_skew_margin` after its end.

Tokens. A new token is `max(seen + 1, wall clock in microseconds)`: the compare-and-set on
the seen token makes it larger than every token the row has issued, and the clock floor
keeps tokens rising once the row is gone: after a lost table, and after an idle row
expired (below). Release removes only the lease cells; `fencing_token` stays.

Idle rows expire. The TTL is not the lease (see above), but it lets the row of a lock
nobody uses go, so a workload of ever new lock names does not fill the table: `take` and
`renew` write all three cells of the row with

    USING TTL <cells> = ceil((lease + clock_skew_margin) / 1 s) + 1 s + idle_retention

(0, no expiry, past CQL's 20-year maximum). They are the only writes to a lock's row
besides `release`, which deletes cells and writes none, and they write no row marker
(an UPDATE does not), so a row is gone once its cells expired, all at once. Hence:

- A live lease never expires: every cell of its row was written with the lease, by the
  grant or the last renewal, and lives until the lease's end plus the margin (after which
  no instance counts the lease as held), plus `idle_retention` for the clocks of the
  replicas, which judge TTLs, running ahead of the instances'; the extra second is TTL's
  whole-second granularity (a cell may expire up to 1 s early). A renewal writes the
  token again with the rest, lest it expire under a lease renewed past its grant's TTL
  (and `acquire` refuses a live foreign lease even on a row without a token).
- Tokens still rise after the row expired: the next grant takes the clock floor. Each
  token the row held was at most the granting instance's clock in microseconds, unless
  the token before was already larger (then one more), and the row's cells were last
  written at least `idle_retention` before they expired. So the new token is larger
  unless the clocks involved (instances', replicas') are apart by more than
  `idle_retention`: a retention of a day (the default) leaves that to gross clock errors
  only, and tokens across a lost table already rested on the clocks.
- The state marker is written `USING TTL 0`: no expiry, also under a table's
  `default_time_to_live`. Rows of earlier versions (an INSERT wrote a row marker without
  TTL) lose their cells like any other but keep that marker: such a row reads as a row
  without a token, which `take` grants on as on a missing row.

State loss. The table holds one row that is not a lock, the state marker:
service '' (the service refuses empty names, so no client can name this row) and domain
'state-marker', with `expires_at` = grace_until (wall-clock ms until which grants are
refused), `fencing_token` = when it was created (ms) and `holder` = the instance that
created it. It shares the lock rows' fate: a truncated, dropped or recreated table, or
replicas that lost their data, lose it too. `check_state()` reads it serially; when it is
missing, it is created with `marker` (`IF NOT EXISTS`: one instance wins and logs the
loss) and grace_until = now + `grace_ms`. Every first grant of a lock checks it the same
way first (first grants arriving together share one check), so a recreated table is
caught by the first acquire. The grace period is cached as a monotonic deadline: while
it lasts, `acquire` and `keep_alive` refuse without a round trip. grace_until is on the
finder's wall clock, so the other instances keep it `clock_skew_margin` longer (as a
foreign lease), lest a clock running ahead end it early.

A write whose Paxos round times out has an unknown outcome: it may still be applied
(a later round completes it). Such calls raise `StoreUnavailable` saying so; the caller
learns the truth by calling again (an acquire by the same client refreshes its own lease).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

import acsylla
from acsylla import errors as cass_errors
from loguru import logger
from pydantic import Field, ValidationInfo, field_validator

from quorum_quest.errors import StoreContended, StoreUnavailable
from quorum_quest.stores.base import (
    Acquisition,
    GracePeriod,
    Holder,
    LockKey,
    LockStore,
    Renewal,
    StoreSettings,
)

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_WRITE_CONSISTENCIES = {
    "ANY",
    "ONE",
    "TWO",
    "THREE",
    "QUORUM",
    "ALL",
    "LOCAL_QUORUM",
    "EACH_QUORUM",
    "LOCAL_ONE",
}
_SERIAL_CONSISTENCIES = {"SERIAL", "LOCAL_SERIAL"}
# `fencing_token` is a CQL bigint, so no lease in the table has a token outside this range
# (the wire's uint64 reaches past it, and the driver cannot bind such a value).
_TOKENS = range(1, 2**63)
_STRATEGIES = {"SimpleStrategy", "NetworkTopologyStrategy"}
# The rounds of compare-and-set one acquire may need: each retry means the row changed in
# between (another grant or refresh), so a few suffice unless a lock is fought over hard;
# an acquire that loses them all raises `StoreContended`.
_MAX_ROUNDS = 8
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    service text, domain text, holder text, expires_at bigint, fencing_token bigint,
    PRIMARY KEY ((service, domain)))
"""
_KEY = "WHERE service = ? AND domain = ?"
# A write of a lease: all three cells, with one TTL (see `_cells_ttl_s`).
_LEASE = "UPDATE {table} USING TTL ? SET holder = ?, expires_at = ?, fencing_token = ? " + _KEY
# Every write is a conditional statement; `{table}` is the quoted "keyspace"."table".
_STATEMENTS = {
    # On a missing row the conditions see nulls: the first grant is a take of (null, ...).
    "take": _LEASE + " IF holder = ? AND expires_at = ? AND fencing_token = ?",
    # A renewal never moves a lease's end back: one delivered late (its `now` is old)
    # must not undo a later one. Refused, it shows the row, which may already reach as far.
    "renew": _LEASE + " IF holder = ? AND fencing_token = ? AND expires_at > ? AND expires_at < ?",
    "release": "DELETE holder, expires_at FROM {table} "
    + _KEY
    + " IF holder = ? AND expires_at > ?",
    "release_token": "DELETE holder, expires_at FROM {table} "
    + _KEY
    + " IF holder = ? AND fencing_token = ? AND expires_at > ?",
    "read": "SELECT holder, expires_at, fencing_token FROM {table} " + _KEY,
    # Every row, a page at a time: the table has no index by service (see `leaders`).
    "scan": "SELECT service, domain, holder, expires_at, fencing_token FROM {table}",
    "ping": "SELECT release_version FROM system.local",
    # The state marker never expires: TTL 0 also overrides a default_time_to_live.
    "marker": "INSERT INTO {table} (service, domain, holder, expires_at, fencing_token) "
    "VALUES (?, ?, ?, ?, ?) IF NOT EXISTS USING TTL 0",
}
# CQL refuses TTLs above 20 years; a lease that long gets no TTL at all.
MAX_CQL_TTL_S = 630_720_000
# idle_retention's upper bound, seconds: a year is more than any clock error, and keeps
# expiry dates inside what Cassandra's 4.x storage format holds (2038-01-19) until 2037.
MAX_IDLE_RETENTION_S = 365 * 24 * 3600
# How many (lock, client) -> token hints an instance keeps for `keep_alive`.
TOKEN_HINTS = 10_000
RECONNECT_DELAY_MS = 500
# Rows per page of the scan behind `leaders`.
SCAN_PAGE_ROWS = 1_000
# Preparing a statement on a table another instance is creating: tries, and the pause.
PREPARE_ATTEMPTS = 10
PREPARE_RETRY_S = 0.5
# The state marker's row: no client can name it, since the service refuses empty names.
STATE_MARKER = LockKey("", "state-marker")
# Who created a marker, for whoever finds it in the table.
_INSTANCE = f"{socket.gethostname()}:{os.getpid()}"
_NO_SCHEMA_HINT = " (create_schema is off: create the table as docs/backends/scylladb.md shows)"
# Server and client timeouts: the LWT may or may not have been applied.
_UNKNOWN_OUTCOME = (
    cass_errors.CassErrorServerWriteTimeout,
    cass_errors.CassErrorServerReadTimeout,
    cass_errors.CassErrorServerWriteFailure,
    cass_errors.CassErrorLibRequestTimedOut,
)


def _consistency_name(value: str, allowed: set[str]) -> str:
    """`CONSISTENCY_QUORUM`, `quorum` and `QUORUM` all name QUORUM."""
    name = value.strip().upper().removeprefix("CONSISTENCY_")
    if name not in allowed:
        raise ValueError(f"unknown consistency {value!r}; use one of {', '.join(sorted(allowed))}")
    return name


def _split_endpoint(endpoint: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address -> (host, port or None)."""
    endpoint = endpoint.strip()
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        port = rest.removeprefix(":")
    elif endpoint.count(":") == 1:
        host, port = endpoint.split(":")
    else:
        host, port = endpoint, ""
    if not host:
        raise ValueError(f"endpoint {endpoint!r} names no host")
    if not port:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r} has no valid port")
    return host, int(port)


class ScyllaSettings(StoreSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=9042, gt=0, lt=65536)
    endpoints: list[str] = Field(
        default_factory=list,
        description="contact points, host[:port]; when given they replace host/port",
    )
    keyspace: str = "quorumquest"
    table: str = "services"
    consistency: str = Field(default="QUORUM", description="commit consistency of every write")
    serial_consistency: str = Field(
        default="SERIAL", description="Paxos consistency: SERIAL or LOCAL_SERIAL"
    )
    username: str = ""
    password: str = ""
    local_datacenter: str = Field(default="", description="route to this datacenter first")
    create_schema: bool = Field(default=True, description="create a missing keyspace and table")
    replication: dict[str, Any] | None = Field(
        default=None,
        description="keyspace replication: {class: NetworkTopologyStrategy, <dc>: 3, ...}",
        validate_default=True,
    )
    clock_skew_margin: float = Field(
        default=1.0,
        ge=0,
        description="seconds a foreign lease stays taken after its end, for clock skew",
    )
    request_timeout: float = Field(default=5.0, gt=0, description="seconds per CQL request")
    connect_timeout: float = Field(default=5.0, gt=0, description="seconds to connect to a node")
    idle_retention: int = Field(
        default=86_400,
        gt=0,
        le=MAX_IDLE_RETENTION_S,
        description="seconds a lock's row outlives its last lease (plus the margin) before"
        " its TTL ends; covers clock errors up to that much",
    )

    @field_validator("keyspace", "table")
    @classmethod
    def _cql_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid name: use 1 to 48 letters, digits or underscores, "
                "starting with a letter"
            )
        return value

    @field_validator("consistency")
    @classmethod
    def _write_consistency(cls, value: str) -> str:
        return _consistency_name(value, _WRITE_CONSISTENCIES)

    @field_validator("serial_consistency")
    @classmethod
    def _serial_consistency(cls, value: str) -> str:
        return _consistency_name(value, _SERIAL_CONSISTENCIES)

    @field_validator("endpoints", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):  # QUORUMQUEST_STORE_ENDPOINTS="a:9042,b:9042"
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("endpoints")
    @classmethod
    def _one_port(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # The driver connects to every contact point on one port.
        ports = {port for _, port in map(_split_endpoint, value)}
        if len(ports - {None}) > 1 or (len(ports) > 1 and info.data.get("port") not in ports):
            raise ValueError(
                "all endpoints must use one port (the driver connects to every contact point "
                f"on the same port); got {', '.join(value)}"
            )
        return value

    @field_validator("password")
    @classmethod
    def _needs_username(cls, value: str, info: ValidationInfo) -> str:
        if value and not info.data.get("username"):
            raise ValueError("a password needs a username")
        return value

    @field_validator("replication")
    @classmethod
    def _replication(
        cls, value: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        if value is None:
            if info.data.get("create_schema", True) and len(info.data.get("endpoints") or []) > 1:
                raise ValueError(
                    "required to create the keyspace on a cluster of several endpoints, e.g. "
                    "{class: NetworkTopologyStrategy, <datacenter>: 3}"
                )
            return None
        strategy = str(value.get("class", "")).rsplit(".", 1)[-1]
        if strategy not in _STRATEGIES:
            raise ValueError(f"'class' must be one of {', '.join(sorted(_STRATEGIES))}")
        factors = {key: factor for key, factor in value.items() if key != "class"}
        if strategy == "SimpleStrategy" and set(factors) != {"replication_factor"}:
            raise ValueError(
                "SimpleStrategy takes exactly one key besides 'class': replication_factor"
            )
        if not factors:
            raise ValueError("name a replication factor per datacenter, e.g. {<datacenter>: 3}")
        for key, factor in factors.items():
            if isinstance(factor, bool) or not str(factor).isdigit() or int(factor) < 1:
                raise ValueError(f"the replication factor of {key!r} must be a positive integer")
        return {"class": strategy, **{key: int(factor) for key, factor in factors.items()}}

    def contact_points(self) -> tuple[list[str], int]:
        """The hosts the driver starts from, and the one port it uses for all of them."""
        if not self.endpoints:
            return [self.host], self.port
        split = [_split_endpoint(endpoint) for endpoint in self.endpoints]
        ports = {port for _, port in split if port is not None}
        return [host for host, _ in split], ports.pop() if ports else self.port

    def replication_cql(self) -> str:
        """The keyspace's replication map as a CQL literal (SimpleStrategy RF 1 by default)."""
        replication = self.replication or {"class": "SimpleStrategy", "replication_factor": 1}
        return (
            "{"
            + ", ".join(f"{_cql_string(k)}: {_cql_string(str(v))}" for k, v in replication.items())
            + "}"
        )


def _cql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class _Row:
    """A lock row as an LWT answer or a read shows it; all None when there is no row."""

    holder: str | None = None
    expires_at: int | None = None
    token: int | None = None

    def live(self, now_ms: int, margin_ms: int = 0) -> bool:
        return (
            self.holder is not None
            and self.expires_at is not None
            and self.expires_at + margin_ms > now_ms
        )


class ScyllaStore(LockStore):
    backend = "scylladb"
    settings_model = ScyllaSettings
    settings: ScyllaSettings
    # Any retention keeps every lease (see `_cells_ttl_s`): a reload takes it on in place.
    policy_keys = LockStore.policy_keys | {"idle_retention"}

    def __init__(self, settings: ScyllaSettings, *, grace_ms: int = 0) -> None:
        super().__init__(settings, grace_ms=grace_ms)
        hosts, port = settings.contact_points()
        self._where = ",".join(hosts) + f":{port}"
        self._table = f'"{settings.keyspace}"."{settings.table}"'
        self._margin_ms = int(settings.clock_skew_margin * 1000)
        self._write_cl = getattr(acsylla.Consistency, settings.consistency)
        self._serial_cl = getattr(acsylla.Consistency, settings.serial_consistency)
        options: dict[str, Any] = {
            "port": port,
            "consistency": self._write_cl,
            "serial_consistency": self._serial_cl,
            "request_timeout": settings.request_timeout,
            "connect_timeout": settings.connect_timeout,
            "application_name": "quorum-quest",
            # Retry a lost node every RECONNECT_DELAY_MS: the driver's default backs off
            # to a minute, so calls kept failing long after the node was back. acsylla
            # applies its exponential policy (2 s doubling to 60 s by default) over the
            # constant one, so that one is pinned to the same delay too.
            "constant_reconnect_delay_ms": RECONNECT_DELAY_MS,
            "exponential_reconnect_base_delay_ms": RECONNECT_DELAY_MS,
            "exponential_reconnect_max_delay_ms": RECONNECT_DELAY_MS,
        }
        if settings.username:
            options.update(username=settings.username, password=settings.password)
        if settings.local_datacenter:
            options["load_balance_dc_aware"] = settings.local_datacenter
        self._cluster = acsylla.create_cluster(hosts, **options)
        self._session: acsylla.Session | None = None
        self._statements: dict[str, acsylla.PreparedStatement] = {}
        # The token of the lease this instance last granted or renewed, per (lock, client):
        # a keep-alive names it in `renew` without reading the row first. Only a hint: the
        # condition checks it, and a refusal shows the lease's real token.
        self._tokens: dict[tuple[LockKey, str], int] = {}
        self._grace = GracePeriod(
            self.backend,
            margin_ms=self._margin_ms,
            marker=self._table,
            loss=f"the state marker row was missing from {self._table} on {self._where} (the "
            "table is new, or was truncated or recreated, or its replicas lost their data)",
        )

    # -- set-up ---------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._session = await self._cluster.create_session()
        except cass_errors.CassException as exc:
            raise StoreUnavailable(self.backend, f"cannot connect to {self._where}: {exc}") from exc
        try:
            if self.settings.create_schema:
                await self._create_schema()
            await self._prepare()
            await self.check_state()
        except BaseException:
            await self.close()
            raise

    async def _create_schema(self) -> None:
        keyspace, table = self.settings.keyspace, self.settings.table
        if not await self._exists("keyspaces", keyspace):
            if self.settings.replication is None:
                logger.warning(
                    "scylladb: creating keyspace {} with SimpleStrategy and replication factor 1: "
                    "for development only; production wants NetworkTopologyStrategy with 3 "
                    "replicas per datacenter (store.replication)",
                    keyspace,
                )
            create = (
                f'CREATE KEYSPACE IF NOT EXISTS "{keyspace}" '
                f"WITH replication = {self.settings.replication_cql()}"
            )
            if await self._is_scylla():
                # ScyllaDB has refused LWT on tablet keyspaces; versions without tablets
                # (or that enforce them) reject the option, and get the plain statement.
                try:
                    await self._ddl(create + " AND tablets = {'enabled': false}")
                except (
                    cass_errors.CassErrorServerSyntaxError,
                    cass_errors.CassErrorServerConfigError,
                    cass_errors.CassErrorServerInvalidQuery,
                ):
                    await self._ddl(create)
            else:
                await self._ddl(create)
            logger.info("scylladb: created keyspace {} on {}", keyspace, self._where)
        if not await self._exists("tables", keyspace, table):
            await self._ddl(_CREATE_TABLE.format(table=self._table))
            logger.info("scylladb: created table {}.{} on {}", keyspace, table, self._where)

    async def _exists(self, kind: str, keyspace: str, table: str = "") -> bool:
        query = f"SELECT keyspace_name FROM system_schema.{kind} WHERE keyspace_name = ?"
        values = [keyspace]
        if table:
            query += " AND table_name = ?"
            values.append(table)
        result = await self._execute(
            "schema set-up", acsylla.create_statement(query, parameters=len(values)), values
        )
        return result.first() is not None

    async def _is_scylla(self) -> bool:
        """ScyllaDB's system.local has columns of its own (scylla_nr_shards, ...)."""
        statement = acsylla.create_statement("SELECT * FROM system.local")
        local = await self._execute("schema set-up", statement)
        return any(name.startswith("scylla_") for name in local.columns_names())

    async def _ddl(self, query: str) -> None:
        await self._execute("schema set-up", acsylla.create_statement(query))

    async def _prepare(self) -> None:
        """Prepare every statement once for this session (a missing table fails here)."""
        assert self._session is not None
        for name, template in _STATEMENTS.items():
            for attempt in range(PREPARE_ATTEMPTS):
                try:
                    self._statements[name] = await self._session.create_prepared(
                        template.format(table=self._table)
                    )
                    break
                except cass_errors.CassException as exc:
                    # Another instance creating the same table at the same moment: the
                    # schema may reach this session's node a little later.
                    if self.settings.create_schema and attempt + 1 < PREPARE_ATTEMPTS:
                        await asyncio.sleep(PREPARE_RETRY_S)
                        continue
                    hint = "" if self.settings.create_schema else _NO_SCHEMA_HINT
                    raise StoreUnavailable(
                        self.backend,
                        f"{self._where}: cannot prepare {name} on {self._table}: {exc}{hint}",
                    ) from exc

    async def close(self) -> None:
        session, self._session = self._session, None
        self._statements = {}
        if session is not None:
            await session.close()

    # -- running statements ---------------------------------------------------------------

    async def _execute(
        self,
        operation: str,
        statement: Any,
        values: list[Any] | None = None,
        *,
        lwt: bool = False,
        consistency: acsylla.Consistency | None = None,
    ) -> acsylla.Result:
        if self._session is None:
            raise StoreUnavailable(self.backend, f"{self._where}: the store is not started")
        try:
            if isinstance(statement, str):
                statement = self._statements[statement].bind(values, consistency=consistency)
            elif values is not None:
                statement.bind_list(values)
            return await self._session.execute(statement)
        except _UNKNOWN_OUTCOME as exc:
            if lwt:
                raise StoreUnavailable(
                    self.backend,
                    f"{self._where}: {operation}: the outcome is unknown: the lightweight "
                    f"transaction timed out and may still be applied; call again to learn the "
                    f"state ({exc})",
                ) from exc
            raise StoreUnavailable(self.backend, f"{self._where}: {operation}: {exc}") from exc
        except (cass_errors.CassException, OSError) as exc:
            raise StoreUnavailable(self.backend, f"{self._where}: {operation}: {exc}") from exc

    async def _lwt(
        self, operation: str, statement: str, values: list[Any]
    ) -> tuple[bool, _Row | None]:
        """Run a conditional statement: whether it applied, and the row its answer shows.

        The row is None when the answer carries no row values (Cassandra answers an applied
        LWT with `[applied]` alone, and a refused one with the columns of its conditions).
        """
        row = (await self._execute(operation, statement, values, lwt=True)).first()
        if row is None:
            raise StoreUnavailable(
                self.backend, f"{self._where}: {operation}: an LWT answered no row"
            )
        answer = row.as_dict()
        applied = bool(answer["[applied]"])
        if not {"holder", "expires_at", "fencing_token"} <= answer.keys():
            return applied, None
        return applied, _Row(answer["holder"], answer["expires_at"], answer["fencing_token"])

    async def _read(self, operation: str, key: LockKey) -> _Row:
        """The lock's row, read linearizably (at the serial consistency)."""
        result = await self._execute(
            operation, "read", [key.service, key.domain], consistency=self._serial_cl
        )
        row = result.first()
        if row is None:
            return _Row()
        answer = row.as_dict()
        return _Row(answer["holder"], answer["expires_at"], answer["fencing_token"])

    # -- the protocol ---------------------------------------------------------------------

    async def ping(self) -> None:
        await self._execute("ping", "ping", [], consistency=acsylla.Consistency.ONE)

    async def check_state(self) -> int:
        """Concurrent callers (first grants arriving together, say) share one check."""
        return await self._grace.check(self._check_marker)

    async def _check_marker(self) -> int:
        """Read the state marker serially, creating it when missing; the ms of grace left."""
        operation = "check_state"
        marker = await self._read(operation, STATE_MARKER)
        if marker.expires_at is None:
            now_ms = _now_ms()
            grace_until = now_ms + self.grace_ms
            applied, marker = await self._lwt(
                operation,
                "marker",
                [STATE_MARKER.service, STATE_MARKER.domain, _INSTANCE, grace_until, now_ms],
            )
            if applied:
                return self._grace.lost(grace_until, self.grace_ms)
            if marker is None or marker.expires_at is None:
                marker = await self._read(operation, STATE_MARKER)
        return self._grace.learn_marker(marker.expires_at or 0, marker.token or 0)

    async def acquire(self, key: LockKey, client_id: str, ttl_ms: int) -> Acquisition:
        if left := self._grace.left_ms():
            return Acquisition.grace_refusal(left)
        seen: _Row | None = await self._read("acquire", key)
        for _ in range(_MAX_ROUNDS):
            if seen is None:  # a refused LWT always shows its condition columns; be safe
                seen = await self._read("acquire", key)
            now_ms = _now_ms()
            if seen.holder != client_id and seen.live(now_ms, self._margin_ms):
                assert seen.expires_at is not None
                return Acquisition(
                    False, seen.holder or "", seen.token or 0, max(0, seen.expires_at - now_ms)
                )
            if seen.token is None:
                # No lock state: the lock's first grant, a lock idle long enough for its row to
                # expire, or a table that lost its rows. `take` grants it on the empty row.
                if left := await self.check_state():
                    return Acquisition.grace_refusal(left)
            elif seen.holder == client_id and seen.live(now_ms):
                held = seen.token
                renewed, seen = await self._renew("acquire", key, client_id, held, ttl_ms)
                if renewed:
                    return Acquisition(True, client_id, held, ttl_ms, refreshed=True)
                continue
            token = _now_us() if seen.token is None else max(seen.token + 1, _now_us())
            now_ms = _now_ms()
            applied, seen = await self._lwt(
                "acquire",
                "take",
                [
                    self._cells_ttl_s(ttl_ms),
                    client_id,
                    now_ms + ttl_ms,
                    token,
                    key.service,
                    key.domain,
                    seen.holder,
                    seen.expires_at,
                    seen.token,
                ],
            )
            if applied:
                self._hint(key, client_id, token)
                return Acquisition(True, client_id, token, ttl_ms)
        # Every round's compare-and-set lost to another change: no refusal is true (the
        # last row seen may be free again), so say what happened. Nothing was granted.
        raise StoreContended(
            self.backend,
            f"{self._where}: acquire: the lock changed hands before each of {_MAX_ROUNDS} "
            "compare-and-sets; nothing was granted: call again",
        )

    def _cells_ttl_s(self, ttl_ms: int) -> int:
        """The TTL of the cells of a lease of `ttl_ms` written now: past the lease's end plus
        `clock_skew_margin` (after which no instance counts it as held), rounded up, plus 1 s
        (a TTL counts whole seconds on the replica, so a cell may expire up to 1 s early),
        plus `idle_retention` (see the module docstring); 0 (no expiry) past CQL's maximum."""
        seconds = -(-(ttl_ms + self._margin_ms) // 1000) + 1 + self.settings.idle_retention
        return seconds if seconds <= MAX_CQL_TTL_S else 0

    async def _renew(
        self, operation: str, key: LockKey, client_id: str, token: int, ttl_ms: int
    ) -> tuple[bool, _Row | None]:
        """Extend the caller's live lease with fencing token `token` to end `ttl_ms` from now,
        writing its cells anew with their TTL: whether it is renewed, and the row shown."""
        now_ms = _now_ms()
        ends = now_ms + ttl_ms
        applied, seen = await self._lwt(
            operation,
            "renew",
            [
                self._cells_ttl_s(ttl_ms),
                client_id,
                ends,
                token,
                key.service,
                key.domain,
                client_id,
                token,
                now_ms,
                ends,
            ],
        )
        if applied or _reaches(seen, client_id, ends, token):
            self._hint(key, client_id, token)
            return True, seen
        return False, seen

    def _hint(self, key: LockKey, client_id: str, token: int | None) -> None:
        """Remember (or, with None, forget) the token of the caller's lease, newest last."""
        self._tokens.pop((key, client_id), None)
        if token is not None:
            self._tokens[(key, client_id)] = token
            if len(self._tokens) > TOKEN_HINTS:
                del self._tokens[next(iter(self._tokens))]

    async def keep_alive(self, key: LockKey, client_id: str, ttl_ms: int) -> Renewal:
        if self._grace.left_ms():
            return Renewal(False)
        token = self._tokens.get((key, client_id))
        for _ in range(_MAX_ROUNDS):
            if token is None:
                row = await self._read("keep_alive", key)
                if row.holder != client_id or row.token is None or not row.live(_now_ms()):
                    self._hint(key, client_id, None)
                    return Renewal(False)
                token = row.token
            renewed, seen = await self._renew("keep_alive", key, client_id, token, ttl_ms)
            if renewed:
                return Renewal(True, token)
            if seen is None:
                token = None  # a refusal that shows no row: read it
            elif seen.holder == client_id and seen.token not in (None, token):
                token = seen.token  # the caller's lease has another token: renew that one
            else:
                self._hint(key, client_id, None)
                return Renewal(False)
        raise StoreContended(
            self.backend,
            f"{self._where}: keep_alive: the caller's lease changed before each of "
            f"{_MAX_ROUNDS} renewals; nothing was renewed: call again",
        )

    async def release(self, key: LockKey, client_id: str, token: int = 0) -> bool:
        if not token:
            values = [key.service, key.domain, client_id, _now_ms()]
            applied, _ = await self._lwt("release", "release", values)
        elif token in _TOKENS:
            values = [key.service, key.domain, client_id, token, _now_ms()]
            applied, _ = await self._lwt("release", "release_token", values)
        else:
            applied = False  # a token no lease can have: nothing to release
        if applied:
            self._hint(key, client_id, None)
        return applied

    async def leaders(self, service: str) -> dict[LockKey, Holder]:
        """The held locks of `service`, from a scan of the whole table a page at a time
        at `consistency`, filtered here: the table's partition key is the pair (service,
        domain), so nothing narrower can be asked for. The leadership watch scans when a
        stream of a whole service starts and then every `server.watchInterval`; on a large
        table, watch locks by name instead."""
        held: dict[LockKey, Holder] = {}
        page_state: bytes | None = None
        while True:
            statement = self._statements["scan"].bind(
                page_size=SCAN_PAGE_ROWS, page_state=page_state, consistency=self._write_cl
            )
            result = await self._execute("leaders", statement)
            now_ms = _now_ms()
            for found in result.all():
                row = found.as_dict()
                if row["service"] != service:
                    continue
                lease = _Row(row["holder"], row["expires_at"], row["fencing_token"])
                if lease.live(now_ms):
                    assert lease.holder is not None and lease.expires_at is not None
                    held[LockKey(service, row["domain"])] = Holder(
                        lease.holder, lease.token or 0, max(0, lease.expires_at - now_ms)
                    )
            if not result.has_more_pages():
                return held
            page_state = result.page_state()

    async def get_leader(self, key: LockKey) -> Holder | None:
        row = await self._read("get_leader", key)
        now_ms = _now_ms()
        if not row.live(now_ms):
            return None
        assert row.holder is not None and row.expires_at is not None
        return Holder(row.holder, row.token or 0, max(0, row.expires_at - now_ms))


def _reaches(seen: _Row | None, client_id: str, ends: int, token: int | None = None) -> bool:
    """Whether a refused renewal found the caller's lease already ending at `ends` or later
    (a renewal that was applied after this one was sent): then it is renewed all the same."""
    return (
        seen is not None
        and seen.holder == client_id
        and seen.expires_at is not None
        and seen.expires_at >= ends
        and (token is None or seen.token is None or seen.token == token)
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _now_us() -> int:
    return time.time_ns() // 1_000
