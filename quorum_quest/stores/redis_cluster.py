"""The Redis store on Redis Cluster (`store.cluster: true`): the same guarantees, sharded.

What it guarantees, as the single-primary store (quorum_quest.stores.redis) does:
every acquire, keep-alive and release is ONE atomic Lua script, run on the primary
that owns the lock's hash slot; a lock is never granted twice while a lease on it
lives, fencing tokens of a lock only rise, and a shard that lost its data refuses its
own locks for the state-loss grace period.

Keys. A lock's keys share its hash tag, `{<service>:<domain>}`, so they live in one
slot, on one shard: `lock:{svc:dom}` (the lease), `lock:{svc:dom}:waiting`,
`lock:{svc:dom}:token` (a counter of earlier versions, taken into the floor). The
scripts are redis.py's own; only the state marker moves.

The state marker, one per slot: `lock:{<tag>}:state`, where `<tag>` is a short string
that hashes to the slot (`slot_tag`), so the marker lives in the slot of the locks it
guards, and moves with them when a slot is resharded. Why per slot and not per lock:
a lock that is free leaves nothing in Redis, so a marker of its own would either stay
forever (every lock name ever used costs memory) or go with the lease, and then a
missing marker could not tell "never used" from "lost": every new name would start a
grace period. A slot's marker is written once and stays (16384 at most, ~2.5 MB).
Why not one per node: a key belongs to a slot, not a node; a per-node key would sit in
a slot the node may give away. So the shard that restarts empty, or whose replica took
over (new run_id; or `master_replid2` after a promotion), loses the markers of its own
slots only: its slots' first check (an operation, or the sweep below) starts the grace
period there; every other shard keeps granting.

The sweep. `check_state` (at start, then every health interval) runs one script per
primary over the markers of every slot it owns (a script flagged
`allow-cross-slot-keys` may read keys of several slots of its own node): it reads INFO
once and checks each marker as `_GRACE` does, ~1 µs per slot, some 5 ms per primary of
a 3-primary cluster. So a fresh or reset shard is found without waiting for a lock to
be asked, and a new key prefix starts its grace period at once on every slot, as the
single-primary store does.

Fencing tokens. A grant takes max(the slot marker's `last_token` + 1, the primary's
clock in µs), as on one primary. A lock stays in its slot, so the slot's `last_token`
floors its tokens while the slot's data lives, and it moves with the slot when
resharded. When a shard loses its data (and `last_token` with it), the floor is the
clock: every token issued before was at most the clock of the primary that issued it
at that moment; the next grant comes at least a grace period (maxTtl) after the loss
was found, on a clock that is then later, so it is larger, unless the new primary's
clock runs behind the old one's by more than the grace period (NTP keeps hosts within
milliseconds).

Batches. `keep_alive_many` (and `get_leaders`) split the keys by slot, one
`_KEEP_ALIVE_MANY` script per slot (up to `LOCKS_PER_SCRIPT` locks), sent through
redis-py's cluster pipeline: one write per primary, the primaries in parallel.
MOVED and ASK are followed, and the slot map refreshed, by redis-py's `RedisCluster`.

Release wake-ups and the changes channel. The scripts PUBLISH on classic channels,
which Redis Cluster broadcasts to every node, so the subscriber listens on any one
node, and moves to the next one it knows when it loses that one.

Health. `ping` fails when a node reports `cluster_state:fail`, and probes each
primary as the single-primary store probes its one (a write, the eviction policy,
the role); a primary that does not answer makes only its own locks answer
UNAVAILABLE while the cluster still reports `ok`.

Limits. A slot migrated to another primary carries the marker of the old primary
(its run_id): its first check on the new primary starts a grace period for that
slot's locks (safe, and only for that slot). The sweep is O(slots) per check.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis
from loguru import logger
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import NoScriptError, RedisError

from quorum_quest.errors import StoreUnavailable
from quorum_quest.stores.base import Holder, LockKey, LockStore, Renewal
from quorum_quest.stores.redis import (
    _KEEP_ALIVE_MANY,
    _PROBE,
    _SCAN_LEADERS,
    LOCKS_PER_SCRIPT,
    PROBE_TTL_MS,
    SAFE_EVICTION_POLICY,
    SCAN_COUNT,
    RedisSettings,
    RedisStore,
    _glob_escape,
    _lock_of,
    _Script,
)

# ARGV[1] grace_ms, ARGV[2..] the state markers of slots this primary owns. Checks each
# marker as `_GRACE` (redis.py) does, reading INFO once: -> {the longest grace period
# left in ms, how many markers found a loss (and recorded it), the last such reason}.
_SWEEP = _Script("""#!lua flags=allow-cross-slot-keys
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local replication = redis.call('INFO', 'replication')
if string.match(replication, 'role:(%a+)') ~= 'master' then
  return redis.error_reply('READONLY a replica; the lock state is kept on the primary')
end
local replid = string.match(replication, 'master_replid:(%x+)') or ''
local replid2 = string.match(replication, 'master_replid2:(%x+)') or ''
local was_replica = string.find(replid2, '[^0]')
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local grace_ms = tonumber(ARGV[1])
local longest, lost, why = 0, 0, ''
for i = 2, #ARGV do
  local marker = ARGV[i]
  local state = redis.call('HMGET', marker, 'run_id', 'grace_until', 'replid')
  local reason = 'missing'
  if state[1] == run_id and (state[3] == replid or not state[3] or not was_replica) then
    if state[3] ~= replid then redis.call('HSET', marker, 'replid', replid) end
    longest = math.max(longest, tonumber(state[2]) - now)
  else
    if state[1] == run_id then reason = 'promoted' elseif state[1] then reason = 'run_id' end
    redis.call('HSET', marker, 'run_id', run_id, 'replid', replid,
      'detected_at', string.format('%d', now),
      'grace_until', string.format('%d', now + grace_ms), 'reason', reason)
    longest = math.max(longest, grace_ms)
    lost = lost + 1
    why = reason
  end
end
return {longest, lost, why}
""")


@cache
def _slot_tags() -> tuple[str, ...]:
    """For each slot, the shortest hex string (the first found) that hashes to it."""
    tags: dict[int, str] = {}
    for number in itertools.count():
        tag = format(number, "x")
        tags.setdefault(key_slot(tag.encode()), tag)
        if len(tags) == REDIS_CLUSTER_HASH_SLOTS:
            return tuple(tags[slot] for slot in range(REDIS_CLUSTER_HASH_SLOTS))
    raise AssertionError("unreachable")


def slot_tag(slot: int) -> str:
    """A hash tag whose keys live in `slot`."""
    return _slot_tags()[slot]


def _address(address: str) -> ClusterNode:
    host, _, port = address.rpartition(":")
    return ClusterNode(host, int(port))


class RedisClusterStore(RedisStore):
    """The `redis` store when `store.cluster` is true (made by `RedisStore(...)`)."""

    def __init__(self, settings: RedisSettings, *, grace_ms: int = 0) -> None:
        LockStore.__init__(self, settings, grace_ms=grace_ms)
        prefix = settings.key_prefix
        self._marker = f"{prefix}:state"  # not used: each slot has its own (`_marker_of`)
        self._probe = f"{prefix}:probe"
        self._channel = f"{prefix}:released"
        self._changes = f"{prefix}:changes"
        self._subscriber: asyncio.Task[None] | None = None
        self._pipe = None
        self._redis = None
        self._sentinel = None
        options: dict[str, Any] = {
            "username": settings.username or None,
            "password": settings.password or None,
            "socket_timeout": settings.timeout,
            "socket_connect_timeout": settings.timeout,
            "max_connections": settings.max_connections,
            # A shard that is down must not stop the others' locks.
            "require_full_coverage": False,
        }
        if settings.nodes:
            seeds = [_address(address) for address in settings.nodes]
            self._cluster = RedisCluster(startup_nodes=seeds, ssl=settings.tls, **options)
            self._where = f"cluster {','.join(settings.nodes)}"
        elif settings.url:
            self._cluster = RedisCluster.from_url(settings.url, **options)
            self._where = f"cluster {settings.url.rsplit('@', 1)[-1]}"
        else:
            self._cluster = RedisCluster(
                host=settings.host, port=settings.port, ssl=settings.tls, **options
            )
            self._where = f"cluster {settings.host}:{settings.port}"
        self._next_subscription = 0
        # Calls in flight, all primaries together. redis-py's cluster client fails a
        # call at once (MaxConnectionsError) when its node has `max_connections` busy,
        # where the other Redis clients of the store wait for one; so calls wait here,
        # one place short of the cap, which the release subscriber may take.
        self._calls = asyncio.Semaphore(max(1, settings.max_connections - 1))

    # -- keys --------------------------------------------------------------------------

    def _slot_key(self, slot: int, name: str) -> str:
        return f"{self.settings.key_prefix}:{{{slot_tag(slot)}}}:{name}"

    def _marker_of(self, lock: str) -> str:
        return self._slot_key(key_slot(lock.encode()), "state")

    # -- running scripts ---------------------------------------------------------------

    async def _run(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        """`script` on the primary that owns `keys` (one slot); with no keys, on any."""
        try:
            async with self._calls:
                try:
                    return await self._cluster.evalsha(script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    # That primary lost its script cache (restart, failover): EVAL loads it.
                    return await self._cluster.eval(script.source, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def _run_each(self, script: _Script, keys: list[list[str]], args: list[Any]) -> list[Any]:
        """`script` once per key list (each of one slot), in the cluster pipeline: one
        write per primary, the primaries in parallel; answers in order."""
        try:
            replies = await self._cluster_pipeline(script.sha, keys, args)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                again = await self._cluster_pipeline(None, [keys[i] for i in missing], args, script)
                for index, reply in zip(missing, again, strict=True):
                    replies[index] = reply
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def _cluster_pipeline(
        self,
        sha: str | None,
        keys: list[list[str]],
        args: list[Any],
        script: _Script | None = None,
    ) -> list[Any]:
        async with self._calls, self._cluster.pipeline() as pipeline:
            for each in keys:
                # redis-py blocks the `evalsha` method of a cluster pipeline (a script's
                # keys could span slots); ours are of one slot, routed by the first.
                if sha is not None:
                    pipeline.execute_command("EVALSHA", sha, len(each), *each, *args)
                else:
                    assert script is not None
                    pipeline.execute_command("EVAL", script.source, len(each), *each, *args)
            return await pipeline.execute(raise_on_error=False)

    async def _on_primaries(self, command: Callable[[ClusterNode], Any]) -> list[Any]:
        """`command(primary)` for every primary at once; answers or exceptions, in order."""
        primaries = self._cluster.get_primaries()
        return list(
            await asyncio.gather(*(command(node) for node in primaries), return_exceptions=True)
        )

    def _slots_of(self, node: ClusterNode) -> list[int]:
        cache_ = self._cluster.nodes_manager.slots_cache
        return [slot for slot, nodes in cache_.items() if nodes and nodes[0].name == node.name]

    async def _eval_on(self, node: ClusterNode, script: _Script, args: list[Any]) -> Any:
        async with self._calls:
            try:
                return await self._cluster.execute_command(
                    "EVALSHA", script.sha, 0, *args, target_nodes=node
                )
            except NoScriptError:
                return await self._cluster.execute_command(
                    "EVAL", script.source, 0, *args, target_nodes=node
                )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._cluster.initialize()
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        await super().start()

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            await asyncio.gather(self._subscriber, return_exceptions=True)
        await self._cluster.aclose()

    async def ping(self) -> None:
        """Return when the cluster reports `cluster_state:ok` and every primary that
        answers can grant (as `RedisStore.ping`); raise `StoreUnavailable` otherwise."""
        state = await self._cluster_state()
        if state != "ok":
            raise StoreUnavailable(
                self.backend, f"{self._where}: cluster_state is {state or 'unknown'}"
            )

        async def probe(node: ClusterNode) -> tuple[str, list[str]]:
            slots = self._slots_of(node)
            if not slots:
                return node.name, [SAFE_EVICTION_POLICY, "master", ""]
            # A key in one of the primary's slots: the probe's write lands there.
            key = self._slot_key(slots[0], "probe")
            reply = await self._run(_PROBE, [key], [PROBE_TTL_MS])
            return node.name, [value.decode() for value in reply]

        answered = 0
        for answer in await self._on_primaries(probe):
            if isinstance(answer, StoreUnavailable):
                continue  # that shard's locks answer UNAVAILABLE; the others serve
            if isinstance(answer, BaseException):
                raise answer
            answered += 1
            name, (policy, role, refused) = answer
            where = f"{self._where} (primary {name})"
            if policy != SAFE_EVICTION_POLICY:
                raise StoreUnavailable(
                    self.backend,
                    f"{where}: maxmemory-policy is {policy or 'unknown'}: Redis may evict a "
                    f"lease while the state marker stays; set maxmemory-policy "
                    f"{SAFE_EVICTION_POLICY}",
                )
            if role != "master" or refused:
                raise StoreUnavailable(
                    self.backend, f"{where}: cannot grant a lock: {refused or role}"
                )
        if not answered:
            raise StoreUnavailable(self.backend, f"{self._where}: no primary answers")

    async def _cluster_state(self) -> str:
        """`cluster_state` as the first node that answers reports it."""
        failure: Exception | None = None
        for node in self._cluster.get_nodes():
            try:
                async with self._calls:
                    info = await self._cluster.execute_command("CLUSTER INFO", target_nodes=node)
            except (RedisError, OSError) as exc:
                failure = exc
                continue
            state = info.get("cluster_state", "") if isinstance(info, dict) else ""
            return state.decode() if isinstance(state, bytes) else str(state)
        raise self._unavailable(failure or RedisError("no cluster node known"))

    async def check_state(self) -> int:
        """Sweep every slot's marker on every primary (see the module's docstring); the
        longest grace period left of any slot."""

        async def sweep(node: ClusterNode) -> tuple[str, list[Any]]:
            markers = [self._slot_key(slot, "state") for slot in self._slots_of(node)]
            if not markers:
                return node.name, [0, 0, b""]
            return node.name, await self._eval_on(node, _SWEEP, [self.grace_ms, *markers])

        longest = 0
        for answer in await self._on_primaries(sweep):
            if isinstance(answer, BaseException):
                if isinstance(answer, RedisError | OSError):
                    # Perhaps a slot map gone stale (a failover, a reshard): the next
                    # check sweeps by a fresh one.
                    await self._refresh_slots()
                    raise self._unavailable(answer) from answer
                raise answer
            name, (left, lost, why) = answer
            if lost:
                self._lost_on(str(lost), f"found by the sweep on primary {name}", why)
            longest = max(longest, int(left))
        return longest

    async def _refresh_slots(self) -> None:
        try:
            await self._cluster.nodes_manager.initialize()
        except (RedisError, OSError) as exc:
            logger.debug("redis cluster: reading the slot map of {} failed: {}", self._where, exc)

    def _noticed(self, detected: int, why: bytes | str) -> None:
        """Log a state loss that an operation's script just found in its slot's marker."""
        if not detected:
            return
        reason = why.decode() if isinstance(why, bytes) else why
        cause = {
            "missing": "the slot's state marker is missing: its primary restarted without "
            "its data, was flushed, or is new",
            "promoted": "its primary was a replica since and is primary again",
        }.get(
            reason,
            "the slot's primary changed (run_id): a restart from a snapshot, a replica "
            "took over, or the slot was migrated here",
        )
        self._lost_on("one", cause, reason)

    def _lost_on(self, slots: str, cause: str, why: bytes | str) -> None:
        reason = why.decode() if isinstance(why, bytes) else why
        refused = (
            f"refusing their grants for {self.grace_ms / 1000:g} s (state-loss grace period)"
            if self.grace_ms
            else "the grace period is off"
        )
        logger.warning(
            "redis cluster lock state lost for {} slot(s) of {}: {} ({}); {}",
            slots,
            self._where,
            cause,
            reason,
            refused,
        )

    # -- batches -----------------------------------------------------------------------

    async def keep_alive_many(
        self, keys: Sequence[LockKey], client_id: str, ttl_ms: int
    ) -> list[Renewal]:
        if not keys:
            return []
        by_slot: dict[int, list[int]] = {}
        locks = [self._lock_key(key) for key in keys]
        for index, lock in enumerate(locks):
            by_slot.setdefault(key_slot(lock.encode()), []).append(index)
        chunks: list[list[int]] = []
        for indices in by_slot.values():
            chunks += [
                indices[start : start + LOCKS_PER_SCRIPT]
                for start in range(0, len(indices), LOCKS_PER_SCRIPT)
            ]
        scripts = [
            [self._marker_of(locks[chunk[0]]), *(locks[i] for i in chunk)] for chunk in chunks
        ]
        replies = await self._run_each(
            _KEEP_ALIVE_MANY, scripts, [client_id, ttl_ms, self.grace_ms]
        )
        renewals: list[Renewal] = [Renewal(False)] * len(keys)
        for chunk, (detected, why, *tokens) in zip(chunks, replies, strict=True):
            self._noticed(detected, why)
            for index, token in zip(chunk, tokens, strict=True):
                renewals[index] = Renewal(token > 0, max(0, int(token)))
        return renewals

    async def leaders(self, service: str) -> dict[LockKey, Holder]:
        """A SCAN for the service's lock keys on every primary."""
        prefix = _glob_escape(self.settings.key_prefix)
        pattern = f"{prefix}:{{{quote(service, safe='')}:*}}"
        start = len(self.settings.key_prefix) + 2

        async def scan(node: ClusterNode) -> dict[LockKey, Holder]:
            held: dict[LockKey, Holder] = {}
            cursor: bytes | str = "0"
            while True:
                cursor, *found = await self._eval_on(
                    node, _SCAN_LEADERS, [cursor, pattern, SCAN_COUNT]
                )
                for index in range(0, len(found), 4):
                    key, holder, token, ttl = found[index : index + 4]
                    held[_lock_of(key[start:-1])] = Holder(holder.decode(), int(token), int(ttl))
                if cursor in (b"0", "0"):
                    return held

        held: dict[LockKey, Holder] = {}
        for answer in await self._on_primaries(scan):
            if isinstance(answer, BaseException):
                if isinstance(answer, RedisError | OSError):
                    raise self._unavailable(answer) from answer
                raise answer
            held.update(answer)
        return held

    # -- pub/sub: classic channels, broadcast by the cluster to every node ---------------

    def _subscriber_client(self) -> aioredis.Redis:
        """A client of one node for a subscription, the next known node each time."""
        nodes = self._cluster.get_nodes() or [_address(a) for a in self.settings.nodes]
        node = nodes[self._next_subscription % len(nodes)]
        self._next_subscription += 1
        settings = self.settings
        return aioredis.Redis(
            host=node.host,
            port=int(node.port),
            ssl=settings.tls,
            username=settings.username or None,
            password=settings.password or None,
            socket_connect_timeout=settings.timeout,
        )
