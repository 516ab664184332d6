"""The Redis store: TTLs enforced by Redis itself, each operation one Lua script.

Keys (with the default `key_prefix: lock`):

    lock:{<service>:<domain>}          hash {holder, token}, expires with the lease
    lock:{<service>:<domain>}:token    the lock's fencing counter, never expires

service and domain are percent-encoded, so ':' inside a name cannot make two pairs
collide, and '{'/'}' cannot break the hash tag: both keys of one lock share a hash
slot, which is what Redis Cluster requires of a script's keys. A batch of renewals
is one non-transactional pipeline of the single-lock script: one round trip, each
script atomic on its own and touching one slot, so a batch never needs its locks to
share a slot. The counter outlives
the lease on purpose: a token must stay larger than every token issued before,
also after expiry and release. It is floored at the server's clock in
microseconds, so a counter lost with the data still never repeats a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis
from pydantic import Field, field_validator
from redis.exceptions import NoScriptError, RedisError

from quorum_quest.errors import StoreUnavailable
from quorum_quest.stores.base import (
    Acquisition,
    Holder,
    LockKey,
    LockStore,
    Renewal,
    StoreSettings,
)

# KEYS[1] lock hash, KEYS[2] counter; ARGV[1] client_id, ARGV[2] ttl_ms.
# -> {1, token, holder, ttl_ms} when granted, {2, ...} when the caller's lease was refreshed,
#    {0, token, holder, pttl} when someone else holds it
# Lua numbers are doubles: exact up to 2**53 (year 2255 in microseconds), but they
# must be written with '%d', since tostring() would round them to 14 digits.
_ACQUIRE = """
local lease = redis.call('HMGET', KEYS[1], 'holder', 'token')
if lease[1] == false then
  local token = redis.call('INCR', KEYS[2])
  local clock = redis.call('TIME')
  local floor = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  if token < floor then
    token = floor
    redis.call('SET', KEYS[2], string.format('%d', token))
  end
  redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', string.format('%d', token))
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, token, ARGV[1], tonumber(ARGV[2])}
end
if lease[1] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {2, tonumber(lease[2]), ARGV[1], tonumber(ARGV[2])}
end
return {0, tonumber(lease[2]), lease[1], redis.call('PTTL', KEYS[1])}
"""

# KEYS[1] lock hash; ARGV[1] client_id, ARGV[2] ttl_ms. -> token, or 0 if not the holder
_KEEP_ALIVE = """
local lease = redis.call('HMGET', KEYS[1], 'holder', 'token')
if lease[1] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(lease[2])
end
return 0
"""

# KEYS[1] lock hash; ARGV[1] client_id, ARGV[2] token or '0' for any. -> 1 if deleted
_RELEASE = """
local lease = redis.call('HMGET', KEYS[1], 'holder', 'token')
if lease[1] == ARGV[1] and (ARGV[2] == '0' or lease[2] == ARGV[2]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] lock hash. -> {holder, token, pttl} or {} when free
_GET_LEADER = """
local lease = redis.call('HMGET', KEYS[1], 'holder', 'token')
if lease[1] == false then return {} end
return {lease[1], tonumber(lease[2]), redis.call('PTTL', KEYS[1])}
"""


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
        return value


class RedisStore(LockStore):
    backend = "redis"
    settings_model = RedisSettings
    settings: RedisSettings

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__(settings)
        # A blocking pool: past `max_connections` a call waits (up to `timeout`) for a
        # free connection instead of failing at once with "Too many connections".
        options: dict[str, Any] = {
            "socket_timeout": settings.timeout,
            "socket_connect_timeout": settings.timeout,
            "max_connections": settings.max_connections,
            "timeout": settings.timeout,
            "password": settings.password or None,
            "username": settings.username or None,
        }
        if settings.url:
            self._pool = aioredis.BlockingConnectionPool.from_url(settings.url, **options)
            self._where = settings.url.rsplit("@", 1)[-1]
        else:
            connection = aioredis.SSLConnection if settings.tls else aioredis.Connection
            self._pool = aioredis.BlockingConnectionPool(
                host=settings.host,
                port=settings.port,
                db=settings.db,
                connection_class=connection,
                **options,
            )
            self._where = f"{settings.host}:{settings.port}/{settings.db}"
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._keep_alive = self._redis.register_script(_KEEP_ALIVE)
        self._release = self._redis.register_script(_RELEASE)
        self._get_leader = self._redis.register_script(_GET_LEADER)

    def _lock_key(self, key: LockKey) -> str:
        name = f"{quote(key.service, safe='')}:{quote(key.domain, safe='')}"
        return f"{self.settings.key_prefix}:{{{name}}}"

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(self.backend, f"{self._where}: {exc}") from exc

    async def _run_each(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        """Run `script` once per key (with the same `args`) in one pipeline, in order."""
        try:
            replies = await self._pipeline(script, keys, args)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                # Redis lost its script cache (restart, SCRIPT FLUSH): a script that
                # answered NOSCRIPT did not run, so load it and run those again.
                await self._redis.script_load(script.script)
                again = await self._pipeline(script, [keys[i] for i in missing], args)
                for index, reply in zip(missing, again, strict=True):
                    replies[index] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(self.backend, f"{self._where}: {exc}") from exc

    async def _pipeline(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        # EVALSHA directly: `script(client=pipeline)` would first ask SCRIPT EXISTS,
        # a second round trip per batch.
        async with self._redis.pipeline(transaction=False) as pipeline:
            for key in keys:
                pipeline.evalsha(script.sha, 1, key, *args)
            return await pipeline.execute(raise_on_error=False)

    async def start(self) -> None:
        await self.ping()

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(self.backend, f"{self._where}: {exc}") from exc

    async def acquire(self, key: LockKey, client_id: str, ttl_ms: int) -> Acquisition:
        lock = self._lock_key(key)
        outcome, token, holder, ttl = await self._run(
            self._acquire, [lock, f"{lock}:token"], [client_id, ttl_ms]
        )
        return Acquisition(
            outcome > 0, holder.decode(), int(token), max(0, int(ttl)), refreshed=outcome == 2
        )

    async def keep_alive(self, key: LockKey, client_id: str, ttl_ms: int) -> Renewal:
        token = await self._run(self._keep_alive, [self._lock_key(key)], [client_id, ttl_ms])
        return Renewal(token > 0, int(token))

    async def keep_alive_many(
        self, keys: Sequence[LockKey], client_id: str, ttl_ms: int
    ) -> list[Renewal]:
        if not keys:
            return []
        locks = [self._lock_key(key) for key in keys]
        tokens = await self._run_each(self._keep_alive, locks, [client_id, ttl_ms])
        return [Renewal(token > 0, int(token)) for token in tokens]

    async def release(self, key: LockKey, client_id: str, token: int = 0) -> bool:
        keys, args = [self._lock_key(key)], [client_id, str(token)]
        return bool(await self._run(self._release, keys, args))

    async def get_leader(self, key: LockKey) -> Holder | None:
        lease = await self._run(self._get_leader, [self._lock_key(key)], [])
        if not lease:
            return None
        holder, token, remaining = lease
        return Holder(holder.decode(), int(token), max(0, int(remaining)))
