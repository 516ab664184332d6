"""The Redis store: TTLs enforced by Redis itself, each operation one Lua script.

Keys (with the default `key_prefix: lock`):

    lock:{<service>:<domain>}          hash {holder, token}, expires with the lease
    lock:{<service>:<domain>}:waiting  set while a caller waits for the lock's release
    lock:state                         the state marker {run_id, replid, grace_until,
                                       last_token, ...}
    lock:probe                         the health probe's write, deleted at once
    lock:released                      pub/sub channel: releases of awaited locks
    lock:changes                       pub/sub channel: every grant and release, for
                                       the leadership watch

service and domain are percent-encoded, so ':' inside a name cannot make two pairs
collide, and '{'/'}' cannot break the hash tag. A batch of renewals is one write of
scripts of up to `LOCKS_PER_SCRIPT` locks each: one round trip, each script atomic on
its own.

Waiting for a release. An acquire that waits (`wait_ms`) sets the lock's waiting
flag, or lengthens it (never shortens: another caller may wait longer); a release
that finds the flag publishes the lock's name, and every service instance subscribed
(the one the service starts with `notify_releases`) wakes its waiters on that lock,
wherever the release came in.

The leadership watch. The scripts that grant and release publish each change on
`lock:changes` (`g <token> <ttl_ms> <lock> <holder>`, `r <token> <lock>`; the lock's name
percent-encoded, so the spaces are the only ones before the holder), in the same atomic
step as the change, so a subscriber hears the changes of one lock in order. A PUBLISH
nobody listens to costs Redis ~1 µs; an instance listens (`follow`, on a connection of
its own) only while some stream watches. Pub/sub may drop messages while a subscriber
is disconnected: `follow` ends with `StoreUnavailable`, and the watch subscribes again
and reads what it follows afresh. Expiry is never published (Redis expires the key
silently): the watch reads a lock again at its lease end.

Fencing tokens. A free lock leaves nothing in Redis: its hash goes with its lease
(released, or expired by Redis), so a workload of ever new lock names never fills
Redis. So a token cannot come from a counter of the lock's own; it comes from one
counter for every lock, as in the memory store: `last_token` in the state marker, the
last token granted through it. A grant takes max(last_token + 1, the server's clock in
microseconds) and records it there, in the same script. Hence:

- Over a lock's life, each token is larger than every token granted before through the
  marker, for any lock, so larger than the lock's own earlier ones, whatever the clock
  does: after the clock was set back, tokens count up from last_token until it caught up.
- Across a loss of the state (below: last_token is lost or stale with the leases) the
  floor is the clock. A token granted before the loss was at most the clock when it was
  granted, unless last_token ran ahead of the clock, which takes more than one grant
  per microsecond (one script takes longer) or a clock set back. The next grant reads
  the clock later, so its token is larger. This rests on Redis's clock not being set
  back across a loss, as it always has.

A counter per lock that expires would not do better: it may expire only once the clock
has passed its value, plus a margin against clocks set back, and until then costs ~90
bytes per recently used name. Earlier versions kept such a counter,
`lock:{<service>:<domain>}:token`, with no expiry; a grant still takes it into the
floor and deletes it (KEYS[2] of `_ACQUIRE`), so an upgrade never repeats a token
(docs/backends/redis.md shows how to fold in the counters of names not used again).
Each grant reads and writes one field of the marker, about 1 µs of Redis CPU.

State loss. The marker names the Redis server process (`run_id`) that last
confirmed the state, and its replication ID (`master_replid`) then. A script that
grants or renews first compares them with the server it runs on: a missing marker
means the data is gone (a restart without persistence, a flush, or a new server);
another `run_id` means the server restarted from a possibly old snapshot or a
replica took over; the same `run_id` with a replication ID taken at a promotion
(`master_replid2` set) means this server was a replica since, and came back as
primary possibly without the writes made on the primary meanwhile. In each case
recent writes may be lost, so the same script records a grace period in the marker,
and until it ends no lock is granted, refreshed or renewed, by any service instance.
A new replication ID without a promotion (Redis takes one when a primary without a
backlog gets its first replica, and when it frees the backlog after
`repl-backlog-ttl` without replicas) loses nothing: the marker just takes it on.
The scripts run only on a primary (a replica answers READONLY), and touch the marker
and the lock's keys together, so the store runs against one Redis primary
(standalone or behind Sentinel). On Redis Cluster (`store.cluster`) each hash slot has
a marker of its own: quorum_quest.stores.redis_cluster.

Eviction. A lease is a key with a TTL: under any `maxmemory-policy` but `noeviction`
Redis may evict it while the marker stays, and the lock would be granted again with
no grace period. `ping` (at start and at every health probe) refuses such a Redis.

Health. A Redis can answer every read and still refuse every grant: full memory under
`noeviction` (OOM), a replica (READONLY), too few replicas for `min-replicas-to-write`
(NOREPLICAS). So `ping` proves a write: one script reads the policy and the role and
sets a probe key, then deletes it (nothing stays). A refused first write leaves the
script without effect, so the probe fails exactly when a grant's first write would.
Every `server.healthInterval` (2 s by default) it costs Redis two INFO sections and two
writes, some 20 µs, per service instance.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
from loguru import logger
from pydantic import Field, ValidationInfo, field_validator
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import NoScriptError, RedisError

from quorum_quest.errors import StoreUnavailable
from quorum_quest.stores._redis_pipe import RedisPipe
from quorum_quest.stores.base import (
    Acquisition,
    Holder,
    LockChange,
    LockKey,
    LockStore,
    Renewal,
    StoreSettings,
)


@dataclass(frozen=True, slots=True)
class _Script:
    """A Lua script and its SHA1, by which EVALSHA runs it."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# A batch renewal runs one script per this many locks, all sent in one write: one
# state-marker check per script, and Redis (single-threaded) busy ~1 ms at most per script.
LOCKS_PER_SCRIPT = 500

# KEYS[1] state marker; ARGV[1] grace_ms. Returns the ms left of the grace period (0:
# none) and 1 when this call found the state lost (then also why), recording the loss.
# Raises READONLY on a replica (Sentinel clients then drop the connection).
# The same run_id with another replication ID: a promotion leaves the ID it followed
# in master_replid2, a reset of the backlog (no history lost) leaves zeros there.
# A marker without `replid` (written before it was recorded) is taken at its run_id.
# Lua numbers are doubles: exact up to 2**53 (year 2255 in microseconds), but they
# must be written with '%d', since tostring() would round them to 14 digits.
_GRACE = """
local function grace(marker, grace_ms)
  local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local replication = redis.call('INFO', 'replication')
  if string.match(replication, 'role:(%a+)') ~= 'master' then
    error({err = 'READONLY this Redis is a replica; the lock state is kept on the primary'})
  end
  local replid = string.match(replication, 'master_replid:(%x+)') or ''
  local state = redis.call('HMGET', marker, 'run_id', 'grace_until', 'replid')
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local why = 'missing'
  if state[1] == run_id then
    local replid2 = string.match(replication, 'master_replid2:(%x+)') or ''
    if state[3] == replid or not state[3] or not string.find(replid2, '[^0]') then
      if state[3] ~= replid then redis.call('HSET', marker, 'replid', replid) end
      return math.max(0, tonumber(state[2]) - now), 0, ''
    end
    why = 'promoted'
  elseif state[1] then
    why = 'run_id'
  end
  redis.call('HSET', marker, 'run_id', run_id, 'replid', replid,
    'detected_at', string.format('%d', now),
    'grace_until', string.format('%d', now + tonumber(grace_ms)), 'reason', why)
  return tonumber(grace_ms), 1, why
end
"""

# KEYS[1] state marker; ARGV[1] grace_ms -> {grace left ms, detected, reason}
_CHECK_STATE = _Script(
    _GRACE
    + """
local left, detected, why = grace(KEYS[1], ARGV[1])
return {left, detected, why}
"""
)

# KEYS[1] lock hash, KEYS[2] the lock's counter of earlier versions, KEYS[3] state marker;
# ARGV[1] client_id, ARGV[2] ttl_ms, ARGV[3] grace_ms, ARGV[4] the changes channel and
# ARGV[5] the lock's name (a grant is published there when given). A grant's first write is
# the marker's `last_token` (refused when Redis is out of memory: the script has no effect).
# -> {1, token, holder, ttl_ms} when granted, {2, ...} when the caller's lease was refreshed,
#    {0, token, holder, pttl} when someone else holds it,
#    {3, 0, '', grace left ms} during the state-loss grace period;
#    each followed by (detected, reason) from `grace`.
_ACQUIRE = _Script(
    _GRACE
    + """
local left, detected, why = grace(KEYS[3], ARGV[3])
local function reply(outcome, token, holder, ttl)
  return {outcome, token, holder, ttl, detected, why}
end
if left > 0 then return reply(3, 0, '', left) end
local lease = redis.call('HMGET', KEYS[1], 'holder', 'token')
if lease[1] == false then
  local clock = redis.call('TIME')
  local token = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  local last = tonumber(redis.call('HGET', KEYS[3], 'last_token') or '0')
  local counter = redis.call('GET', KEYS[2])
  if counter then last = math.max(last, tonumber(counter)) end
  if token <= last then token = last + 1 end
  redis.call('HSET', KEYS[3], 'last_token', string.format('%d', token))
  if counter then redis.call('DEL', KEYS[2]) end
  redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', string.format('%d', token))
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if ARGV[4] then
    redis.call('PUBLISH', ARGV[4], 'g ' .. string.format('%d', token) .. ' ' .. ARGV[2] ..
      ' ' .. ARGV[5] .. ' ' .. ARGV[1])
  end
  return reply(1, token, ARGV[1], tonumber(ARGV[2]))
end
if lease[1] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return reply(2, tonumber(lease[2]), ARGV[1], tonumber(ARGV[2]))
end
return reply(0, tonumber(lease[2]), lease[1], redis.call('PTTL', KEYS[1]))
"""
)

# KEYS[1] lock hash, KEYS[2] state marker; ARGV[1] client_id, ARGV[2] ttl_ms,
# ARGV[3] grace_ms. -> {token; 0 if not the holder; -1 during the grace period,
#                         then (detected, reason) from `grace`}
_KEEP_ALIVE = _Script(
    _GRACE
    + """
local left, detected, why = grace(KEYS[2], ARGV[3])
if left > 0 then return {-1, detected, why} end
local lease = redis.call('HMGET', KEYS[1], 'holder', 'token')
if lease[1] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {tonumber(lease[2]), detected, why}
end
return {0, detected, why}
"""
)

# KEYS[1] state marker, KEYS[2..] lock hashes; ARGV as _KEEP_ALIVE.
# -> {detected, reason, then per lock as _KEEP_ALIVE: token, 0 or -1}
_KEEP_ALIVE_MANY = _Script(
    _GRACE
    + """
local left, detected, why = grace(KEYS[1], ARGV[3])
local answers = {detected, why}
for i = 2, #KEYS do
  local answer = -1
  if left == 0 then
    answer = 0
    local lease = redis.call('HMGET', KEYS[i], 'holder', 'token')
    if lease[1] == ARGV[1] then
      redis.call('PEXPIRE', KEYS[i], ARGV[2])
      answer = tonumber(lease[2])
    end
  end
  answers[i + 1] = answer
end
return answers
"""
)

# KEYS[1] lock hash, KEYS[2] its waiting flag; ARGV[1] client_id, ARGV[2] token or '0'
# for any, ARGV[3] the release channel, ARGV[4] the lock's name, ARGV[5] the changes
# channel (when given). -> 1 if deleted.
# A release of a lock someone waits on (the flag is set) is published on the release
# channel; every release on the changes channel.
_RELEASE = _Script("""
local lease = redis.call('HMGET', KEYS[1], 'holder', 'token')
if lease[1] == ARGV[1] and (ARGV[2] == '0' or lease[2] == ARGV[2]) then
  redis.call('DEL', KEYS[1])
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
  if ARGV[5] then redis.call('PUBLISH', ARGV[5], 'r ' .. lease[2] .. ' ' .. ARGV[4]) end
  return 1
end
return 0
""")

# KEYS[1] a lock's waiting flag; ARGV[1] ms it must last at least. Lengthens the flag,
# never shortens it: other callers may wait on the lock longer. -> 1 if it was set.
_EXPECT_RELEASE = _Script("""
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
return 1
""")

# KEYS[1] the probe key; ARGV[1] ms it may live. -> {maxmemory_policy, role, the error of
# the probe's write or ''}. The write is the script's first, so a refusal (OOM, READONLY,
# NOREPLICAS) is the one a grant would meet; the key is deleted at once when written.
_PROBE = _Script("""
local policy = string.match(redis.call('INFO', 'memory'), 'maxmemory_policy:([%w-]+)') or ''
local role = string.match(redis.call('INFO', 'replication'), 'role:(%a+)') or ''
local written = redis.pcall('SET', KEYS[1], '1', 'PX', ARGV[1])
if type(written) == 'table' and written.err then return {policy, role, written.err} end
redis.call('DEL', KEYS[1])
return {policy, role, ''}
""")

# KEYS[1] lock hash. -> {holder, token, pttl} or {} when free
_GET_LEADER = _Script("""
local lease = redis.call('HMGET', KEYS[1], 'holder', 'token')
if lease[1] == false then return {} end
return {lease[1], tonumber(lease[2]), redis.call('PTTL', KEYS[1])}
""")

# ARGV[1] a SCAN cursor, ARGV[2] the MATCH pattern, ARGV[3] COUNT. One step of a scan for
# held locks: -> {next cursor, then per lock found: key, holder, token, pttl}. Each step
# is bounded by COUNT, so Redis is never busy long.
_SCAN_LEADERS = _Script("""
local step = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3], 'TYPE', 'hash')
local found = {step[1]}
for _, key in ipairs(step[2]) do
  local lease = redis.call('HMGET', key, 'holder', 'token')
  if lease[1] then
    local ttl = redis.call('PTTL', key)
    if ttl > 0 then
      table.insert(found, key)
      table.insert(found, lease[1])
      table.insert(found, tonumber(lease[2]))
      table.insert(found, ttl)
    end
  end
end
return found
""")


class RedisSettings(StoreSettings):
    host: str = "localhost"
    port: int = Field(default=6379, gt=0, lt=65536)
    password: str = ""
    username: str = ""
    db: int = Field(default=0, ge=0)
    key_prefix: str = "lock"
    url: str = Field(default="", description="redis:// or rediss:// URL; wins over host/port/db")
    tls: bool = False
    timeout: float = Field(default=2.0, gt=0, description="seconds per Redis command")
    max_connections: int = Field(default=64, gt=0)
    sentinels: list[str] = Field(
        default_factory=list,
        description="Sentinel host:port addresses; when set, the primary is found through them",
    )
    master_name: str = Field(default="mymaster", description="the primary's name in Sentinel")
    sentinel_password: str = ""
    cluster: bool = Field(
        default=False,
        description="Redis Cluster: host/port, url or nodes name seed nodes "
        "(quorum_quest.stores.redis_cluster)",
    )
    nodes: list[str] = Field(
        default_factory=list, description="Redis Cluster seed nodes, host:port (with cluster)"
    )

    @field_validator("sentinels", "nodes", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("sentinels", "nodes")
    @classmethod
    def _host_port(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port")
        return value

    @field_validator("cluster")
    @classmethod
    def _not_behind_sentinel(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("sentinels"):
            raise ValueError("Redis Cluster runs without Sentinel: set cluster or sentinels")
        return value

    @field_validator("nodes")
    @classmethod
    def _only_with_cluster(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value and not info.data.get("cluster"):
            raise ValueError("nodes are Redis Cluster seeds: set cluster: true as well")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("must not contain '{' or '}' (they would break the hash tag)")
        return value

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if value:
            RedisPipe.from_url(value)  # ValueError for query options it does not take
        return value


# A waiting flag outlives the wait it announces by this much.
WAITING_SLACK_MS = 1_000
# The release subscriber reads with this timeout (so it checks its connection), and
# waits this long before subscribing again after losing it.
SUBSCRIBER_POLL_S = 1.0
# Keys one step of a scan for a service's held locks looks at.
SCAN_COUNT = 1_000

# `_ACQUIRE`'s outcome while the state-loss grace period lasts.
_GRACE_PERIOD = 3
_SCRIPTS = (
    _CHECK_STATE,
    _ACQUIRE,
    _KEEP_ALIVE,
    _KEEP_ALIVE_MANY,
    _RELEASE,
    _EXPECT_RELEASE,
    _PROBE,
    _GET_LEADER,
    _SCAN_LEADERS,
)
# The only `maxmemory-policy` under which Redis never deletes a lease before its TTL.
SAFE_EVICTION_POLICY = "noeviction"
# The health probe's key lives at most this long, should its deletion ever be lost.
PROBE_TTL_MS = 10_000


class _SentinelBlockingPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Connections to the primary Sentinel names, waiting for a free one past the maximum."""


class RedisStore(LockStore):
    backend = "redis"
    settings_model = RedisSettings
    settings: RedisSettings

    def __new__(cls, settings: RedisSettings, *, grace_ms: int = 0) -> RedisStore:
        """`store.cluster: true` makes the store a `RedisClusterStore`."""
        if cls is RedisStore and settings.cluster:
            from quorum_quest.stores.redis_cluster import RedisClusterStore

            return super().__new__(RedisClusterStore)
        return super().__new__(cls)

    def __init__(self, settings: RedisSettings, *, grace_ms: int = 0) -> None:
        super().__init__(settings, grace_ms=grace_ms)
        self._marker = f"{settings.key_prefix}:state"
        self._probe = f"{settings.key_prefix}:probe"
        self._channel = f"{settings.key_prefix}:released"
        self._changes = f"{settings.key_prefix}:changes"
        self._subscriber: asyncio.Task[None] | None = None
        # Scripts run over one pipelined connection (`RedisPipe`): each command costs
        # a few µs of CPU instead of redis-py's ~60. Sentinel deployments use
        # redis-py, which asks Sentinel for the primary on every new connection.
        self._pipe: RedisPipe | None = None
        self._redis: aioredis.Redis | None = None
        self._sentinel: Sentinel | None = None
        if settings.sentinels:
            self._redis = self._sentinel_client(settings)
            self._where = f"sentinel {settings.master_name}@{','.join(settings.sentinels)}"
        elif settings.url:
            self._pipe = RedisPipe.from_url(
                settings.url,
                username=settings.username,
                password=settings.password,
                timeout=settings.timeout,
            )
            self._where = settings.url.rsplit("@", 1)[-1]
        else:
            self._pipe = RedisPipe(
                host=settings.host,
                port=settings.port,
                db=settings.db,
                username=settings.username,
                password=settings.password,
                ssl=ssl.create_default_context() if settings.tls else None,
                timeout=settings.timeout,
            )
            self._where = f"{settings.host}:{settings.port}/{settings.db}"
        if self._pipe is not None:
            for script in _SCRIPTS:
                self._pipe.register(script.source)

    def _sentinel_client(self, settings: RedisSettings) -> aioredis.Redis:
        """A redis-py client of the primary Sentinel names, on a blocking pool: past
        `max_connections` a call waits (up to `timeout`) for a free connection."""
        addresses = [address.rpartition(":") for address in settings.sentinels]
        self._sentinel = Sentinel(
            [(host, int(port)) for host, _, port in addresses],
            sentinel_kwargs={
                "socket_timeout": settings.timeout,
                "socket_connect_timeout": settings.timeout,
                "password": settings.sentinel_password or None,
            },
        )
        # Connections to a demoted primary are dropped when it answers READONLY.
        return self._sentinel.master_for(
            settings.master_name,
            connection_pool_class=_SentinelBlockingPool,
            db=settings.db,
            ssl=settings.tls,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            max_connections=settings.max_connections,
            timeout=settings.timeout,
            password=settings.password or None,
            username=settings.username or None,
        )

    def _lock_key(self, key: LockKey) -> str:
        return f"{self.settings.key_prefix}:{{{_lock_name(key)}}}"

    def _marker_of(self, lock: str) -> str:
        """The state marker that guards the lock key `lock` (Redis Cluster: one per slot)."""
        return self._marker

    def _noticed(self, detected: int, why: bytes | str) -> None:
        """Log a state loss that a script just found and recorded (once per loss)."""
        if not detected:
            return
        reason = why.decode() if isinstance(why, bytes) else why
        cause = {
            "missing": "the state marker is missing: Redis restarted without its data, "
            "was flushed, or is new",
            "promoted": "this Redis was a replica since it last confirmed the state and is "
            "primary again (master_replid), so writes made meanwhile may be lost",
        }.get(
            reason,
            "the server changed (run_id): Redis restarted from a snapshot or a replica "
            "took over, so recent writes may be lost",
        )
        if self.grace_ms:
            logger.warning(
                "redis lock state lost on {}: {}; refusing new grants for {:g} s "
                "(state-loss grace period)",
                self._where,
                cause,
                self.grace_ms / 1000,
            )
        else:
            logger.warning(
                "redis lock state lost on {}: {}; the state-loss grace period is off",
                self._where,
                cause,
            )

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        """`exc` as a `StoreUnavailable` naming the address once: the pipe's errors
        begin with it, redis-py's do not."""
        detail = str(exc) or type(exc).__name__  # some of redis-py's carry no message
        if self._pipe is None or not detail.startswith(self._pipe.where):
            detail = f"{self._where}: {detail}"
        return StoreUnavailable(self.backend, detail)

    async def _run(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            if self._pipe is not None:
                return await self._pipe.evalsha(script.sha, keys, args)
            assert self._redis is not None
            try:
                return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                # Redis lost its script cache (restart, failover, SCRIPT FLUSH).
                await self._redis.script_load(script.source)
                return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def _run_each(self, script: _Script, keys: list[list[str]], args: list[Any]) -> list[Any]:
        """Run `script` once per key list (with the same `args`) in one round trip, in order."""
        try:
            if self._pipe is not None:
                return await self._pipe.evalsha_many(script.sha, keys, args)
            replies = await self._pipeline(script, keys, args)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                # A script that answered NOSCRIPT did not run: load it, run those again.
                assert self._redis is not None
                await self._redis.script_load(script.source)
                again = await self._pipeline(script, [keys[i] for i in missing], args)
                for index, reply in zip(missing, again, strict=True):
                    replies[index] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def _pipeline(self, script: _Script, keys: list[list[str]], args: list[Any]) -> list[Any]:
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipeline:
            for each in keys:
                pipeline.evalsha(script.sha, len(each), *each, *args)
            return await pipeline.execute(raise_on_error=False)

    async def start(self) -> None:
        await self.ping()
        await self.check_state()
        if self.released is not None:
            self._subscriber = asyncio.create_task(self._watch_releases(self.released))

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            await asyncio.gather(self._subscriber, return_exceptions=True)
        if self._pipe is not None:
            await self._pipe.close()
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()

    async def ping(self) -> None:
        """Return when Redis can grant a lock: it answers, is the primary, accepts a
        write, and cannot evict a lease; raise `StoreUnavailable` otherwise. The policy is
        read from `INFO memory`, which managed Redis offers where `CONFIG GET` may be
        disabled."""
        policy, role, refused = (
            value.decode() for value in await self._run(_PROBE, [self._probe], [PROBE_TTL_MS])
        )
        if policy != SAFE_EVICTION_POLICY:
            found = f"maxmemory-policy is {policy}" if policy else "no maxmemory_policy in INFO"
            raise StoreUnavailable(
                self.backend,
                f"{self._where}: {found}: Redis may evict a lease while the state marker "
                f"stays, and grant its lock again; set maxmemory-policy {SAFE_EVICTION_POLICY}",
            )
        if role != "master":
            raise StoreUnavailable(
                self.backend,
                f"{self._where}: this Redis is a replica ({role or 'no role in INFO'}); "
                "the lock state is kept on the primary",
            )
        if refused:
            raise StoreUnavailable(
                self.backend,
                f"{self._where}: Redis refuses writes, so no lock can be granted: {refused}",
            )

    async def check_state(self) -> int:
        left, detected, why = await self._run(_CHECK_STATE, [self._marker], [self.grace_ms])
        self._noticed(detected, why)
        return int(left)

    async def acquire(self, key: LockKey, client_id: str, ttl_ms: int) -> Acquisition:
        lock = self._lock_key(key)
        outcome, token, holder, ttl, detected, why = await self._run(
            _ACQUIRE,
            [lock, f"{lock}:token", self._marker_of(lock)],
            [client_id, ttl_ms, self.grace_ms, self._changes, _lock_name(key)],
        )
        self._noticed(detected, why)
        if outcome == _GRACE_PERIOD:
            return Acquisition.grace_refusal(int(ttl))
        return Acquisition(
            outcome > 0, holder.decode(), int(token), max(0, int(ttl)), refreshed=outcome == 2
        )

    async def keep_alive(self, key: LockKey, client_id: str, ttl_ms: int) -> Renewal:
        lock = self._lock_key(key)
        reply = await self._run(
            _KEEP_ALIVE, [lock, self._marker_of(lock)], [client_id, ttl_ms, self.grace_ms]
        )
        return self._renewal(reply)

    async def keep_alive_many(
        self, keys: Sequence[LockKey], client_id: str, ttl_ms: int
    ) -> list[Renewal]:
        if not keys:
            return []
        locks = [self._lock_key(key) for key in keys]
        chunks = [
            [self._marker, *locks[start : start + LOCKS_PER_SCRIPT]]
            for start in range(0, len(locks), LOCKS_PER_SCRIPT)
        ]
        replies = await self._run_each(_KEEP_ALIVE_MANY, chunks, [client_id, ttl_ms, self.grace_ms])
        renewals = []
        for detected, why, *tokens in replies:
            self._noticed(detected, why)
            renewals += [Renewal(token > 0, max(0, int(token))) for token in tokens]
        return renewals

    def _renewal(self, reply: list[Any]) -> Renewal:
        token, detected, why = reply
        self._noticed(detected, why)
        return Renewal(token > 0, max(0, int(token)))

    async def release(self, key: LockKey, client_id: str, token: int = 0) -> bool:
        lock = self._lock_key(key)
        keys = [lock, f"{lock}:waiting"]
        args = [client_id, str(token), self._channel, _lock_name(key), self._changes]
        return bool(await self._run(_RELEASE, keys, args))

    async def expect_release(self, key: LockKey, wait_ms: int) -> None:
        """Set the lock's waiting flag, so that its release is published."""
        if self.released is None:
            return
        flag = f"{self._lock_key(key)}:waiting"
        await self._run(_EXPECT_RELEASE, [flag], [wait_ms + WAITING_SLACK_MS])

    async def _watch_releases(self, released: Callable[[LockKey], None]) -> None:
        """Hand every release published on the channel to `released`, until cancelled.

        On its own connection (pub/sub takes one over); after losing it, it subscribes
        again, and waiters meanwhile wake when the holder's lease is due to end. A
        message it cannot read, or that `released` fails on, is logged and skipped;
        any other failure is a lost subscription: only cancellation ends the loop.
        """
        lost = False
        while True:
            # A client of its own per subscription (a cluster's: the next node each time).
            client = self._redis or self._subscriber_client()
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    if lost:
                        logger.info("redis release notifications resumed on {}", self._where)
                        lost = False
                    while True:
                        message = await pubsub.get_message(timeout=SUBSCRIBER_POLL_S)
                        if message is not None:
                            self._hand_over(message.get("data"), released)
            except Exception as exc:  # any: the loop must outlive every failure
                if not lost:
                    logger.warning(
                        "redis release notifications stopped on {}: {}; waiters wake at "
                        "their holder's lease end until they resume",
                        self._where,
                        exc,
                    )
                lost = True
                await asyncio.sleep(SUBSCRIBER_POLL_S)
            finally:
                if client is not self._redis:
                    await client.aclose()

    def _hand_over(self, data: Any, released: Callable[[LockKey], None]) -> None:
        """`released(lock)` for one published lock name; log and skip what fails."""
        try:
            key = _lock_of(data)
        except (AttributeError, UnicodeDecodeError) as exc:
            logger.warning(
                "redis release notifications on {}: skipped a message that names no lock "
                "({!r}: {})",
                self._channel,
                data[:100] if isinstance(data, bytes | str) else data,
                exc,
            )
            return
        try:
            released(key)
        except Exception:
            logger.exception("redis release notifications: waking the waiters on {} failed", key)

    def _subscriber_client(self) -> aioredis.Redis:
        """A redis-py client of the same server for the subscription: reads block."""
        settings = self.settings
        options: dict[str, Any] = {
            "username": settings.username or None,
            "password": settings.password or None,
            "socket_connect_timeout": settings.timeout,
        }
        if settings.url:
            return aioredis.Redis.from_url(settings.url, **options)
        return aioredis.Redis(
            host=settings.host, port=settings.port, db=settings.db, ssl=settings.tls, **options
        )

    # -- the leadership watch --------------------------------------------------------

    tells_changes = True

    async def follow(
        self, changed: Callable[[LockChange], None], synced: Callable[[], None]
    ) -> None:
        """Hand every change published on the changes channel to `changed`, on a
        connection of its own; `StoreUnavailable` when the subscription is lost."""
        client = self._redis or self._subscriber_client()
        try:
            async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(self._changes)
                synced()
                while True:
                    message = await pubsub.get_message(timeout=SUBSCRIBER_POLL_S)
                    if message is not None:
                        self._tell(message.get("data"), changed)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        finally:
            if client is not self._redis:
                await client.aclose()

    def _tell(self, data: Any, changed: Callable[[LockChange], None]) -> None:
        """`changed(...)` for one published change; log and skip one that cannot be read."""
        try:
            kind, token, rest = data.decode().split(" ", 2)
            if kind == "g":
                ttl_ms, name, holder = rest.split(" ", 2)
                change = LockChange(_lock_of(name.encode()), holder, int(token), int(ttl_ms))
            else:
                change = LockChange(_lock_of(rest.encode()), "", int(token))
        except (AttributeError, UnicodeDecodeError, ValueError) as exc:
            logger.warning(
                "redis changes on {}: skipped a message that names no change ({!r}: {})",
                self._changes,
                data[:100] if isinstance(data, bytes | str) else data,
                exc,
            )
            return
        changed(change)

    async def get_leaders(self, keys: Sequence[LockKey]) -> list[Holder | None]:
        if not keys:
            return []
        leases = await self._run_each(_GET_LEADER, [[self._lock_key(key)] for key in keys], [])
        return [
            Holder(lease[0].decode(), int(lease[1]), max(0, int(lease[2]))) if lease else None
            for lease in leases
        ]

    async def leaders(self, service: str) -> dict[LockKey, Holder]:
        """A SCAN for the service's lock keys, in steps of `SCAN_COUNT` keys: O(keys in
        the database), so the watch does it only when a stream starts or resyncs."""
        prefix = _glob_escape(self.settings.key_prefix)
        pattern = f"{prefix}:{{{quote(service, safe='')}:*}}"
        start = len(self.settings.key_prefix) + 2
        held: dict[LockKey, Holder] = {}
        cursor: bytes | str = "0"
        while True:
            cursor, *found = await self._run(_SCAN_LEADERS, [], [cursor, pattern, SCAN_COUNT])
            for index in range(0, len(found), 4):
                key, holder, token, ttl = found[index : index + 4]
                lock = _lock_of(key[start:-1])
                held[lock] = Holder(holder.decode(), int(token), int(ttl))
            if cursor in (b"0", "0"):
                return held

    async def get_leader(self, key: LockKey) -> Holder | None:
        lease = await self._run(_GET_LEADER, [self._lock_key(key)], [])
        if not lease:
            return None
        holder, token, remaining = lease
        return Holder(holder.decode(), int(token), max(0, int(remaining)))


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis glob pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _lock_name(key: LockKey) -> str:
    """`service:domain`, each percent-encoded, so the ':' between them is the only one."""
    return f"{quote(key.service, safe='')}:{quote(key.domain, safe='')}"


def _lock_of(name: bytes) -> LockKey:
    service, _, domain = name.decode().partition(":")
    return LockKey(unquote(service, errors="strict"), unquote(domain, errors="strict"))
