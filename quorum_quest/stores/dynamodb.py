"""The DynamoDB store: every lock is one item, every lock operation one conditional write.

Item layout (table with the single string partition key `pk`, no sort key):

    pk          "lock:" + quote(service) + ":" + quote(domain)
    holder      S   client_id of the holder; absent while the lock is free
    expires_at  N   end of the lease, Unix epoch milliseconds; absent while free
    token       N   the lock's fencing counter; only ever grows
    purge_at    N   epoch seconds from which DynamoDB's TTL may delete the item (see below)

service and domain are percent-encoded (every byte but [A-Za-z0-9_.~-]), so ':' never
occurs inside either part and two different pairs can never share a `pk`.

The writes (each a single `UpdateItem`; a failed `ConditionExpression` is the normal "no"):

    grant    SET holder = :client, expires_at = :expires,
                 token = if_not_exists(token, :seed) + :one, purge_at = :purge
             IF attribute_exists(token) AND (attribute_not_exists(holder)
                OR expires_at <= :stale OR (holder = :client AND expires_at <= :now))
    first    the grant without `attribute_exists(token) AND`
    extend   SET expires_at = :expires, purge_at = :purge
             IF holder = :client AND expires_at > :now AND expires_at < :expires
             (refused, but the caller's lease already ends at :expires or later: renewed)
    release  REMOVE holder, expires_at
             IF holder = :client AND expires_at > :now

`acquire` sends the grant; when its condition fails the answer carries the old item
(`ReturnValuesOnConditionCheckFailure=ALL_OLD`), which names the holder. Only when that
holder is the caller itself, with a live lease, does `acquire` send a second write, the
extend, so the caller keeps its token. When the answer carries no item, there is none:
the lock's first grant, or a table that lost its items; `acquire` then checks the state
marker (below) and sends `first`. No write depends on a read: whatever happened in
between, each condition is judged by DynamoDB on the item as it is at that moment. An
acquire whose every round lost to a change of the lock raises `StoreContended`: nothing
was granted, and no holder is known to name.

The clock: DynamoDB conditions have no server clock, so `:now` is this service
instance's wall clock and every instance sharing a table must keep its clock
synchronised (NTP). An acquiring instance treats a foreign lease as expired only when
`clock_skew_margin` has passed after its end (`:stale = :now - margin`), so an instance
whose clock runs ahead by less than the margin cannot take over a lease that its holder's
instance still keeps alive. A holder's own lease (keep-alive, release, re-acquire) is
judged without the margin.

Tokens: the token is advanced in the very write that grants the lock, so a token is never
issued twice and grows by one per grant. A lock's first grant (no item) seeds the counter
with this instance's clock in microseconds (`:seed`). One grant per microsecond is far
beyond what conditional writes on one item can do, so a lock's tokens stay below the
clock of the instance that seeded them (while clocks are not set back). Release REMOVEs
the holder attributes and keeps the item; an expired lease needs no write at all, since
the conditions compare `expires_at` with the clock.

Idle items expire. DynamoDB's native TTL (enabled on `purge_at`) deletes the item of a
lock nobody used for `idle_retention` seconds, so a workload of ever new lock names does
not fill the table. Every write that grants or extends a lease sets

    purge_at = ceil((expires_at + clock_skew_margin) / 1 s) + idle_retention

and nothing else writes it (release leaves the value of the lease it ends; a refused write
writes nothing; the state marker never has it). Hence:

- TTL never deletes a live lease: TTL deletes only items whose `purge_at` has passed on
  AWS's clock, and no instance considers a lease live past `expires_at` plus the margin,
  so `idle_retention` is the slack for AWS's clock running ahead of the instances'. An item
  that is past its `purge_at` but not deleted yet (DynamoDB deletes up to ~2 days late)
  can still be granted: "successful updates to change or remove the expiration attribute
  are honored" (DynamoDB developer guide, TTL), so the grant's new `purge_at` keeps it.
- Tokens still rise after a deletion: the next grant is a first grant, seeded with the
  clock of the instance that makes it. The deleted counter was below the clock of the
  instance that seeded it, at the item's last grant, and every write to the item came at
  least `idle_retention` before its `purge_at` (a release comes before the lease's end),
  which is before the deletion on AWS's clock. So the new seed is larger unless the
  instances' clocks (and AWS's) are apart by more than `idle_retention`: a retention of
  a day (the default) leaves that to gross clock errors only, and tokens across a lost
  table already rested on the clocks.

Native TTL also removes the store's own write probe (`pk` "probe:write", a day ahead).
Without TTL on `purge_at` (dynalite; a table made without it) nothing is deleted: locks
work the same, and idle items stay.

State loss. The table holds one more item that is not a lock, the state marker
(`pk` "state:marker", which no "lock:" key can be): `grace_until` (wall-clock ms until
which grants are refused), `created_at` (ms) and `created_by` (the instance). It never
carries `purge_at`, and it shares the lock items' fate: a recreated or emptied table
loses it too. `check_state()` reads it (ConsistentRead); when it is missing, it is
created by a conditional write (`attribute_not_exists(pk)`: one instance wins and logs
the loss) with grace_until = now + `grace_ms`. Every first grant checks it the same way
first (first grants arriving together share one check), so a recreated table is caught
by the first acquire. The grace period is cached as a monotonic deadline: while it
lasts, `acquire` and `keep_alive` refuse without a request. grace_until is on the
finder's wall clock, so the other instances keep it `clock_skew_margin` longer (as a
foreign lease), lest a clock running ahead end it early. A table that disappears
while the store runs (deleted, or an emulator restarted in memory) is created again in
the background when `create_table` is on; calls are unavailable until it is ACTIVE,
and then its missing marker starts the grace period.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import re
import socket
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
)
from loguru import logger
from pydantic import Field, SecretStr, field_validator, model_validator

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

KEY = "pk"
HOLDER = "holder"
EXPIRES_AT = "expires_at"
TOKEN = "token"
PURGE_AT = "purge_at"  # the table's native TTL attribute: lock items and the probe
WRITE_PROBE_KEY = "probe:write"
STATE_MARKER_KEY = "state:marker"
GRACE_UNTIL = "grace_until"
CREATED_AT = "created_at"
CREATED_BY = "created_by"

_NAMES = {"#holder": HOLDER, "#expires": EXPIRES_AT, "#token": TOKEN}
# A write that grants or extends a lease names `purge_at` too (see `_purge_at`).
_LEASE_NAMES = {**_NAMES, "#purge": PURGE_AT}
_GRANT = (
    "SET #holder = :client, #expires = :expires,"
    " #token = if_not_exists(#token, :seed) + :one, #purge = :purge"
)
_FIRST_GRANT_IF = (
    "attribute_not_exists(#holder) OR #expires <= :stale"
    " OR (#holder = :client AND #expires <= :now)"
)
# Only an existing lock item: a missing one goes through the state marker check first.
_GRANT_IF = f"attribute_exists(#token) AND ({_FIRST_GRANT_IF})"
_EXTEND = "SET #expires = :expires, #purge = :purge"
# A renewal never moves a lease's end back: one delivered late (its :now is old) must
# not undo a later one. Refused, the item may show the lease already reaching as far.
_EXTEND_IF = "#holder = :client AND #expires > :now AND #expires < :expires"
_RELEASE = "REMOVE #holder, #expires"
_RELEASE_IF = "#holder = :client AND #expires > :now"

_WRITE_PROBE_TTL_S = 24 * 3600
# idle_retention's upper bound, seconds: a year is more than any clock error.
MAX_IDLE_RETENTION_S = 365 * 24 * 3600
_TABLE_ACTIVE_TIMEOUT_S = 300.0  # how long start() waits for a new table to become ACTIVE
_ACQUIRE_ROUNDS = 3  # grant/extend rounds when the lock changes hands between them
_BACKOFF_BASE_S = 0.025
_BACKOFF_CAP_S = 0.5

# Worth another attempt within the call's deadline.
_RETRYABLE = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "TransactionConflictException",
    }
)
# The service refused who we are or what we may do: retrying cannot help.
_CREDENTIALS = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "MissingAuthenticationTokenException",
        "IncompleteSignatureException",
        "ExpiredTokenException",
        "AccessDeniedException",
    }
)
_CONDITION_FAILED = frozenset({"ConditionalCheckFailedException"})
_UNKNOWN_OPERATION = frozenset({"UnknownOperationException"})
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}
# Who created a state marker, for whoever finds it in the table.
_INSTANCE = f"{socket.gethostname()}:{os.getpid()}"


def endpoint_url(endpoint: str) -> str:
    """The endpoint URL for an `endpoints` entry: a full http(s) URL, or a bare host[:port].

    A bare host gets https://, except a loopback host (localhost, 127.0.0.0/8, ::1), which
    gets http:// as local DynamoDB implementations speak plain HTTP.
    """
    value = endpoint.strip()
    if not value:
        raise ValueError("an endpoint must not be empty")
    bare = "://" not in value
    parts = urlsplit(f"//{value}" if bare else value)
    if not bare and parts.scheme not in ("http", "https"):
        raise ValueError(f"{endpoint!r}: the scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"{endpoint!r}: no host")
    if parts.username is not None or parts.query or parts.fragment:
        raise ValueError(f"{endpoint!r}: give only scheme, host, port and path")
    try:
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"{endpoint!r}: {exc}") from None
    if bare:
        scheme = "http" if _is_loopback(parts.hostname) else "https"
        return f"{scheme}:{parts.geturl()}".rstrip("/")
    return value.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def lock_item_key(key: LockKey) -> str:
    """The partition key of a lock's item; distinct pairs give distinct keys."""
    return f"lock:{quote(key.service, safe='')}:{quote(key.domain, safe='')}"


class DynamoSettings(StoreSettings):
    region: str = Field(default="", description="AWS region; empty: AWS_REGION or the profile's")
    table: str = Field(default="quorumquest", pattern=r"^[A-Za-z0-9_.-]{3,255}$")
    endpoints: tuple[str, ...] = Field(
        default=(), description="the first entry overrides the endpoint URL (host or URL)"
    )
    accessKeyId: str = ""
    secretAccessKey: SecretStr = SecretStr("")
    profile: str = Field(default="", description="a profile of the shared AWS config files")
    create_table: bool = Field(
        default=True,
        description="create a missing table (on-demand) and enable TTL on `purge_at`",
    )
    clock_skew_margin: float = Field(
        default=1.0,
        ge=0,
        description="seconds a foreign lease stays taken after its end, for clock skew",
    )
    timeout: float = Field(
        default=2.0, gt=0, description="seconds per store call, retries included"
    )
    idle_retention: int = Field(
        default=86_400,
        gt=0,
        le=MAX_IDLE_RETENTION_S,
        description="seconds a lock's item outlives its last lease (plus the margin) before"
        " TTL may delete it; covers clock errors up to that much",
    )

    @field_validator("endpoints")
    @classmethod
    def _endpoint_forms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for endpoint in value:
            endpoint_url(endpoint)
        return value

    @model_validator(mode="after")
    def _one_credential_source(self) -> DynamoSettings:
        has_id, has_secret = bool(self.accessKeyId), bool(self.secretAccessKey.get_secret_value())
        if has_id != has_secret:
            raise ValueError(
                "accessKeyId and secretAccessKey go together: give both, or neither to use"
                " the profile or the AWS default credential chain"
            )
        if has_id and self.profile:
            raise ValueError("give either profile or accessKeyId/secretAccessKey, not both")
        return self

    @property
    def endpoint_url(self) -> str | None:
        return endpoint_url(self.endpoints[0]) if self.endpoints else None


class DynamoStore(LockStore):
    backend = "dynamodb"
    settings_model = DynamoSettings
    settings: DynamoSettings
    # Any retention keeps every lease (see `_purge_at`): a reload takes it on in place.
    policy_keys = LockStore.policy_keys | {"idle_retention"}

    def __init__(self, settings: DynamoSettings, *, grace_ms: int = 0) -> None:
        super().__init__(settings, grace_ms=grace_ms)
        self._where = f"{settings.endpoint_url or 'AWS'} table {settings.table}"
        self._margin_ms = int(settings.clock_skew_margin * 1000)
        self._exit_stack = AsyncExitStack()
        self._client: Any = None
        self._connecting = asyncio.Lock()
        self._grace = GracePeriod(
            self.backend,
            margin_ms=self._margin_ms,
            marker=self._where,
            loss=f"the state marker item was missing from {self._where} (the table is new, or"
            " was recreated or emptied)",
        )
        self._recreating: asyncio.Future[None] | None = None

    # -- connection -------------------------------------------------------------------

    async def _dynamodb(self) -> Any:
        """The client, created on first use (`start()` normally does it)."""
        if self._client is not None:
            return self._client
        async with self._connecting:
            if self._client is None:
                self._client = await self._new_client()
        return self._client

    async def _new_client(self) -> Any:
        settings = self.settings
        secret = settings.secretAccessKey.get_secret_value()
        try:
            session = aioboto3.Session(
                aws_access_key_id=settings.accessKeyId or None,
                aws_secret_access_key=secret or None,
                region_name=settings.region or None,
                profile_name=settings.profile or None,
            )
            client = session.client(
                "dynamodb",
                endpoint_url=settings.endpoint_url,
                config=AioConfig(
                    connect_timeout=settings.timeout,
                    read_timeout=settings.timeout,
                    # One attempt per request: _call retries within the call's deadline.
                    retries={"total_max_attempts": 1},
                    max_pool_connections=64,
                ),
            )
            return await self._exit_stack.enter_async_context(client)
        except ProfileNotFound as exc:
            raise StoreUnavailable(self.backend, f"profile {settings.profile!r}: {exc}") from exc
        except NoRegionError as exc:
            raise StoreUnavailable(
                self.backend, f"{self._where}: no region; set region or AWS_REGION"
            ) from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(self.backend, f"{self._where}: {exc}") from exc

    async def start(self) -> None:
        if len(self.settings.endpoints) > 1:
            logger.warning(
                "dynamodb: only the first of {} endpoints is used", len(self.settings.endpoints)
            )
        await self._prepare_table()

    async def _prepare_table(self) -> None:
        """Create the table if asked, prove it takes writes, and check the state marker."""
        if self.settings.create_table:
            await self._ensure_table()
        await self._write_probe()
        await self.check_state()

    async def close(self) -> None:
        if self._recreating is not None:
            self._recreating.cancel()
            await asyncio.wait([self._recreating])
        await self._exit_stack.aclose()
        self._client = None

    def _table_missing(self) -> str:
        """With `create_table`, start creating the lost table again in the background (its
        missing state marker then starts a grace period); what to tell the caller."""
        if not self.settings.create_table:
            return " set create_table: true or create it as docs/backends/dynamodb.md shows"
        if self._recreating is None:
            self._recreating = asyncio.ensure_future(self._prepare_table())
            self._recreating.add_done_callback(self._recreated)
        return " creating it again"

    def _recreated(self, task: asyncio.Future[None]) -> None:
        self._recreating = None
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("dynamodb: could not create the table again: {}", error)

    # -- the retry loop ---------------------------------------------------------------

    def _deadline(self) -> float:
        """When a store call that starts now must have its answer (event loop time)."""
        return asyncio.get_running_loop().time() + self.settings.timeout

    async def _call(
        self,
        operation: str,
        /,
        *,
        deadline: float | None = None,
        expected: frozenset[str] = frozenset(),
        **params: Any,
    ) -> Any:
        """Run one DynamoDB operation, retrying what may pass until `deadline`.

        `deadline` is the store call's (one `timeout` from now if not given), so every
        request of one store call shares it. An error whose code is in `expected` (a failed
        condition, say) is raised as the `ClientError` for the caller to read; every other
        failure ends as `StoreUnavailable`.
        """
        method = getattr(await self._dynamodb(), operation)
        budget = self.settings.timeout
        loop = asyncio.get_running_loop()
        deadline = deadline or self._deadline()
        attempts = 0
        while True:
            attempts += 1
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    return await method(**params)
            except ClientError as exc:
                code, message = _error_of(exc)
                if code in expected:
                    raise
                if code in _CREDENTIALS or _status(exc) in (401, 403):
                    raise StoreUnavailable(
                        self.backend,
                        f"{self._where}: {operation} refused, {code}: {message} (check"
                        " accessKeyId/secretAccessKey, profile or the AWS credential chain,"
                        " and the IAM policy)",
                    ) from exc
                if code == "ResourceNotFoundException":
                    raise StoreUnavailable(
                        self.backend,
                        f"{self._where}: {operation}: the table does not exist ({message});"
                        + self._table_missing(),
                    ) from exc
                if code not in _RETRYABLE and _status(exc) < 500:
                    raise StoreUnavailable(
                        self.backend, f"{self._where}: {operation}: {code}: {message}"
                    ) from exc
                problem = f"{code}: {message}"
            except (NoCredentialsError, PartialCredentialsError) as exc:
                raise StoreUnavailable(
                    self.backend,
                    f"{self._where}: {exc}; set accessKeyId/secretAccessKey or profile, or"
                    " configure the AWS default credential chain",
                ) from exc
            except (HTTPClientError, aiohttp.ClientError) as exc:  # connect, read: maybe transient
                problem = str(exc)
            except TimeoutError:
                problem = f"no answer before the {budget:g} s deadline"
            except EndpointConnectionError as exc:  # its text repeats the endpoint
                raise StoreUnavailable(
                    self.backend, f"{self._where}: {operation}: {_cannot_connect(exc)}"
                ) from exc
            except (BotoCoreError, OSError) as exc:
                raise StoreUnavailable(self.backend, f"{self._where}: {operation}: {exc}") from exc
            pause = random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempts))
            if loop.time() + pause >= deadline:
                raise StoreUnavailable(
                    self.backend,
                    f"{self._where}: {operation} failed {attempts} times within {budget:g} s,"
                    f" last: {problem}",
                )
            await asyncio.sleep(pause)

    async def _update(
        self,
        deadline: float,
        key: str,
        update: str,
        condition: str,
        values: Mapping[str, Any],
        *,
        names: Mapping[str, str] = _NAMES,
        old_on_failure: bool = False,
    ) -> tuple[bool, dict[str, Any] | None]:
        """One conditional UpdateItem: (True, new item) or (False, old item when returned)."""
        params: dict[str, Any] = {
            "TableName": self.settings.table,
            "Key": {KEY: {"S": key}},
            "UpdateExpression": update,
            "ConditionExpression": condition,
            "ExpressionAttributeNames": dict(names),
            "ExpressionAttributeValues": dict(values),
            "ReturnValues": "ALL_NEW",
        }
        if old_on_failure:
            params["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        try:
            answer = await self._call(
                "update_item", deadline=deadline, expected=_CONDITION_FAILED, **params
            )
        except ClientError as exc:
            return False, exc.response.get("Item")
        return True, answer.get("Attributes", {})

    async def _read(
        self, key: str, deadline: float, names: Mapping[str, str] = _NAMES
    ) -> dict[str, Any] | None:
        """The item's attributes `names`, read strongly consistently; None when absent."""
        answer = await self._call(
            "get_item",
            deadline=deadline,
            TableName=self.settings.table,
            Key={KEY: {"S": key}},
            ConsistentRead=True,
            ProjectionExpression=", ".join(names),
            ExpressionAttributeNames=dict(names),
        )
        return answer.get("Item") or None

    # -- table management -------------------------------------------------------------

    async def _ensure_table(self) -> None:
        """Create the table if missing, wait until ACTIVE, and enable TTL on `purge_at`.

        An existing table is only described, so CreateTable is needed only the first time;
        a table being deleted is created again once it is gone.
        """
        table = self.settings.table
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _TABLE_ACTIVE_TIMEOUT_S
        pause = 0.05
        status = await self._table_status()
        while status != "ACTIVE":
            if status is None:
                try:
                    await self._call(
                        "create_table",
                        expected=frozenset({"ResourceInUseException"}),
                        TableName=table,
                        AttributeDefinitions=[{"AttributeName": KEY, "AttributeType": "S"}],
                        KeySchema=[{"AttributeName": KEY, "KeyType": "HASH"}],
                        BillingMode="PAY_PER_REQUEST",
                    )
                    logger.info("dynamodb: created table {} (on-demand)", table)
                except ClientError:
                    pass  # another instance is creating it right now
            if loop.time() + pause > deadline:
                raise StoreUnavailable(
                    self.backend,
                    f"{self._where}: table still {status or 'missing'}"
                    f" after {_TABLE_ACTIVE_TIMEOUT_S:g} s",
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
            status = await self._table_status()
        await self._enable_ttl()

    async def _table_status(self) -> str | None:
        """CREATING, ACTIVE, ...; None when there is no such table."""
        try:
            answer = await self._call(
                "describe_table",
                expected=frozenset({"ResourceNotFoundException"}),
                TableName=self.settings.table,
            )
        except ClientError:
            return None
        return answer["Table"]["TableStatus"]

    async def _enable_ttl(self) -> None:
        table = self.settings.table
        answer = await self._call("describe_time_to_live", TableName=table)
        current = answer.get("TimeToLiveDescription", {})
        if current.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
            if current.get("AttributeName") != PURGE_AT:
                logger.warning(
                    "dynamodb: table {} has TTL on {!r}, not {!r}: items of idle locks and"
                    " the probe item are not deleted by TTL",
                    table,
                    current.get("AttributeName"),
                    PURGE_AT,
                )
            return
        try:
            await self._call(
                "update_time_to_live",
                expected=_UNKNOWN_OPERATION,
                TableName=table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": PURGE_AT},
            )
        except ClientError:
            # DynamoDB has the operation; an implementation without it (dynalite) still
            # serves locks, which never depend on TTL deleting an item.
            logger.warning(
                "dynamodb: {} does not support TTL; items of idle locks and the probe item stay",
                self._where,
            )

    async def _write_probe(self) -> None:
        """One write that proves the table exists and accepts our writes; TTL removes it."""
        purge_at = int(time.time()) + _WRITE_PROBE_TTL_S
        await self._call(
            "update_item",
            TableName=self.settings.table,
            Key={KEY: {"S": WRITE_PROBE_KEY}},
            UpdateExpression="SET #purge = :purge",
            ExpressionAttributeNames={"#purge": PURGE_AT},
            ExpressionAttributeValues={":purge": {"N": str(purge_at)}},
        )

    # -- the protocol -----------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(
            "get_item",
            TableName=self.settings.table,
            Key={KEY: {"S": WRITE_PROBE_KEY}},
            ProjectionExpression=KEY,
        )

    async def check_state(self) -> int:
        return await self._grace.check(partial(self._check_marker, self._deadline()))

    async def _check_marker(self, deadline: float) -> int:
        """Read the state marker, creating it when missing; the ms of grace left."""
        names = {"#grace": GRACE_UNTIL, "#at": CREATED_AT}
        marker = await self._read(STATE_MARKER_KEY, deadline, names)
        if marker is None:
            now = _now_ms()
            grace_until = now + self.grace_ms
            created, marker = await self._update(
                deadline,
                STATE_MARKER_KEY,
                "SET #grace = :grace, #at = :at, #by = :by",
                "attribute_not_exists(#pk)",
                {
                    ":grace": {"N": str(grace_until)},
                    ":at": {"N": str(now)},
                    ":by": {"S": _INSTANCE},
                },
                names={**names, "#by": CREATED_BY, "#pk": KEY},
                old_on_failure=True,
            )
            if created:
                return self._grace.lost(grace_until, self.grace_ms)
            if not marker:  # another instance created it; dynalite does not return it
                marker = await self._read(STATE_MARKER_KEY, deadline, names)
        marker = marker or {}
        grace_until = int(marker.get(GRACE_UNTIL, {}).get("N", 0))
        created_at = int(marker.get(CREATED_AT, {}).get("N", 0))
        return self._grace.learn_marker(grace_until, created_at)

    async def acquire(self, key: LockKey, client_id: str, ttl_ms: int) -> Acquisition:
        if left := self._grace.left_ms():
            return Acquisition.grace_refusal(left)
        pk = lock_item_key(key)
        deadline = self._deadline()
        condition = _GRANT_IF
        for _ in range(_ACQUIRE_ROUNDS):
            now = _now_ms()
            granted, item = await self._update(
                deadline,
                pk,
                _GRANT,
                condition,
                {
                    ":client": {"S": client_id},
                    ":expires": {"N": str(now + ttl_ms)},
                    ":purge": {"N": str(self._purge_at(now + ttl_ms))},
                    ":now": {"N": str(now)},
                    ":stale": {"N": str(now - self._margin_ms)},
                    ":one": {"N": "1"},
                    ":seed": {"N": str(_now_us())},
                },
                names=_LEASE_NAMES,
                old_on_failure=True,
            )
            if granted:
                return Acquisition(True, client_id, _Lease.of(item).token, ttl_ms)
            if not item and condition is _GRANT_IF:
                # DynamoDB returns the old item with a failed condition, if there is one. None:
                # the lock's first grant, or a table that lost its items (or an implementation
                # that returns no old item, dynalite: then the first grant's answer tells).
                if left := await self._grace.check(partial(self._check_marker, deadline)):
                    return Acquisition.grace_refusal(left)
                condition = _FIRST_GRANT_IF
                continue
            if not item:  # dynalite: read the old item back; the "no" stands either way
                item = await self._read(pk, deadline)
            lease = _Lease.of(item)
            if lease.holder != client_id:
                if lease.holder is None:
                    continue  # released between the two calls: try the grant again
                return Acquisition(False, lease.holder, lease.token, lease.remaining_ms(now))
            if lease.expires_at <= now:
                continue  # the caller's own lease ran out meanwhile: the grant applies now
            renewal = await self._extend(pk, client_id, ttl_ms, deadline)
            if renewal.renewed:
                return Acquisition(True, client_id, renewal.token, ttl_ms, refreshed=True)
        # The lock changed under every round, so no holder seen is known to hold it now
        # (a free lock or the caller's own lease is no refusal). Nothing was granted.
        raise StoreContended(
            self.backend,
            f"{self._where}: acquire: the lock changed hands during each of {_ACQUIRE_ROUNDS}"
            " rounds of grant and extend; nothing was granted: call again",
        )

    def _purge_at(self, expires_ms: int) -> int:
        """The `purge_at` of an item whose lease ends at `expires_ms`: not before any
        instance may take the lease over (its end plus `clock_skew_margin`, rounded up to
        TTL's whole seconds), and `idle_retention` after that (see the module docstring)."""
        return -(-(expires_ms + self._margin_ms) // 1000) + self.settings.idle_retention

    async def _extend(self, pk: str, client_id: str, ttl_ms: int, deadline: float) -> Renewal:
        now = _now_ms()
        ends = now + ttl_ms
        renewed, item = await self._update(
            deadline,
            pk,
            _EXTEND,
            _EXTEND_IF,
            {
                ":client": {"S": client_id},
                ":expires": {"N": str(ends)},
                ":purge": {"N": str(self._purge_at(ends))},
                ":now": {"N": str(now)},
            },
            names={"#holder": HOLDER, "#expires": EXPIRES_AT, "#purge": PURGE_AT},
            old_on_failure=True,
        )
        if renewed:
            return Renewal(True, _Lease.of(item).token)
        if not item:  # dynalite returns no old item: read it
            item = await self._read(pk, deadline)
        lease = _Lease.of(item)
        # A renewal applied after this one was sent already reaches at least as far.
        if lease.holder == client_id and lease.expires_at >= ends:
            return Renewal(True, lease.token)
        return Renewal(False)

    async def keep_alive(self, key: LockKey, client_id: str, ttl_ms: int) -> Renewal:
        if self._grace.left_ms():
            return Renewal(False)
        return await self._extend(lock_item_key(key), client_id, ttl_ms, self._deadline())

    async def release(self, key: LockKey, client_id: str, token: int = 0) -> bool:
        condition = _RELEASE_IF
        values = {":client": {"S": client_id}, ":now": {"N": str(_now_ms())}}
        names = {"#holder": HOLDER, "#expires": EXPIRES_AT}
        if token:
            condition += " AND #token = :token"
            values[":token"] = {"N": str(token)}
            names["#token"] = TOKEN
        released, _ = await self._update(
            self._deadline(), lock_item_key(key), _RELEASE, condition, values, names=names
        )
        return released

    async def leaders(self, service: str) -> dict[LockKey, Holder]:
        """The held locks of `service`: a strongly consistent Scan of the table, filtered
        to the service's items. DynamoDB has no index by service, so this reads every
        item (1 read unit per 4 KB scanned): the leadership watch does it when a stream
        of a whole service starts, and then every `server.watchInterval`; on a large
        table, watch locks by name instead."""
        now = _now_ms()
        prefix = f"lock:{quote(service, safe='')}:"
        held: dict[LockKey, Holder] = {}
        params: dict[str, Any] = {
            "TableName": self.settings.table,
            "ConsistentRead": True,
            "FilterExpression": "begins_with(#pk, :prefix) AND #expires > :now",
            "ProjectionExpression": "#pk, #holder, #expires, #token",
            "ExpressionAttributeNames": {**_NAMES, "#pk": KEY},
            "ExpressionAttributeValues": {":prefix": {"S": prefix}, ":now": {"N": str(now)}},
        }
        while True:
            answer = await self._call("scan", **params)
            for item in answer.get("Items", ()):
                lease = _Lease.of(item)
                if lease.holder is None:
                    continue
                domain = unquote(item[KEY]["S"][len(prefix) :], errors="strict")
                held[LockKey(service, domain)] = Holder(
                    lease.holder, lease.token, lease.remaining_ms(now)
                )
            if "LastEvaluatedKey" not in answer:
                return held
            params["ExclusiveStartKey"] = answer["LastEvaluatedKey"]

    async def get_leader(self, key: LockKey) -> Holder | None:
        lease = _Lease.of(await self._read(lock_item_key(key), self._deadline()))
        now = _now_ms()
        if lease.holder is None or lease.expires_at <= now:
            return None
        return Holder(lease.holder, lease.token, lease.remaining_ms(now))


@dataclass(frozen=True, slots=True)
class _Lease:
    """A lock item's attributes, decoded; `holder` is None while the lock is free."""

    holder: str | None
    expires_at: int
    token: int

    @classmethod
    def of(cls, item: Mapping[str, Any] | None) -> _Lease:
        item = item or {}
        holder = item.get(HOLDER, {}).get("S")
        expires_at = int(item.get(EXPIRES_AT, {}).get("N", 0))
        return cls(holder, expires_at, int(item.get(TOKEN, {}).get("N", 0)))

    def remaining_ms(self, now: int) -> int:
        return max(0, self.expires_at - now)


def _now_ms() -> int:
    """This instance's wall clock: the only clock lease conditions can use (see above)."""
    return time.time_ns() // 1_000_000


def _now_us() -> int:
    """The same clock in microseconds: the floor of a lock's first token (see above)."""
    return time.time_ns() // 1_000


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _cannot_connect(exc: EndpointConnectionError) -> str:
    """Why the endpoint could not be reached, without its address (named already)."""
    error = exc.kwargs.get("error")
    code = getattr(getattr(error, "os_error", error), "errno", None)
    return f"cannot connect: {os.strerror(code)}" if isinstance(code, int) else "cannot connect"


def _error_of(exc: ClientError) -> tuple[str, str]:
    """The error's code and a one-line message (some emulators answer XML: tags dropped)."""
    error = exc.response.get("Error", {})
    message = str(error.get("Message") or exc.response.get("message") or "")
    message = " ".join(re.sub(r"<[^>]*>", " ", message).split())
    return str(error.get("Code") or "Unknown"), message[:300]
