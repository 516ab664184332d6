"""The Redis client's cost per lock operation: redis-py as the store uses it vs `RedisPipe`.

uv run python -m benchmarks.redis_client_path [--clients 50] [--duration 3] [--runs 3]
    [--loop uvloop|asyncio]

No gRPC and no store logic: --clients asyncio tasks each loop over acquire ->
keep-alive -> release of a lock of its own, running the store's own Lua scripts
(`_ACQUIRE`, `_KEEP_ALIVE`, `_RELEASE`) with the store's keys (its lock key, counter
and state marker; grace_ms 0) against a throw-away redis-server on 127.0.0.1, through

- `redis-py`: the scripts registered on a redis-py `BlockingConnectionPool` sized as
  the store's settings say (the store's client path before `RedisPipe`, and still
  its path behind Sentinel);
- `pipe`: `quorum_quest.stores._redis_pipe.RedisPipe`, the store's path now.

Every reply is checked (granted, renewed, released); a run with any other reply fails.
Each run warms up for 0.5 s, then measures --duration seconds: operations per second
(wall clock), CPU microseconds per operation of this process (`time.process_time`: the
client path, all it runs), and of redis-server, which runs the scripts (from /proc,
Linux only; 10 ms ticks). Runs alternate between the two paths; the table shows
medians and [min - max] over --runs runs each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from benchmarks.proc import cpu_seconds
from quorum_quest.stores import LockKey
from quorum_quest.stores._redis_pipe import RedisPipe
from quorum_quest.stores.redis import (
    _ACQUIRE,
    _KEEP_ALIVE,
    _RELEASE,
    RedisSettings,
    RedisStore,
    _lock_name,
)
from tests.backends.redis import RedisProcess

TTL_MS = 10_000
WARMUP_S = 0.5
PATHS = ("redis-py", "pipe")

# (which script, keys, args) -> the script's reply
Run = Callable[[str, list[str], list[Any]], Awaitable[Any]]


@dataclass
class Sample:
    ops_per_s: float
    cpu_us_per_op: float
    redis_cpu_us_per_op: float


def redis_py_runner(url: str) -> tuple[Run, RedisStore, aioredis.Redis]:
    """The store's scripts on a redis-py client with the pool the store would use."""
    store = RedisStore(RedisSettings(url=url, key_prefix=f"bench-{uuid.uuid4().hex[:8]}"))
    timeout = store.settings.timeout
    client = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=store.settings.max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
    )
    scripts = {
        "acquire": client.register_script(_ACQUIRE.source),
        "keep_alive": client.register_script(_KEEP_ALIVE.source),
        "release": client.register_script(_RELEASE.source),
    }

    async def run(script: str, keys: list[str], args: list[Any]) -> Any:
        return await scripts[script](keys=keys, args=args)

    return run, store, client


def pipe_runner(url: str, store: RedisStore) -> tuple[Run, RedisPipe]:
    """The same scripts through `RedisPipe`, with the store's `timeout`."""
    pipe = RedisPipe.from_url(url, timeout=store.settings.timeout)
    shas = {
        "acquire": pipe.register(_ACQUIRE.source),
        "keep_alive": pipe.register(_KEEP_ALIVE.source),
        "release": pipe.register(_RELEASE.source),
    }

    async def run(script: str, keys: list[str], args: list[Any]) -> Any:
        return await pipe.evalsha(shas[script], keys, args)

    return run, pipe


async def client(
    run: Run, store: RedisStore, name: str, counts: list[int], stop: asyncio.Event
) -> None:
    """acquire -> keep-alive -> release on a lock of its own until `stop`; counts ops."""
    key = LockKey("bench", name)
    lock, marker = store._lock_key(key), store._marker
    acquire_keys, keep_keys = [lock, f"{lock}:token", marker], [lock, marker]
    release_keys, published = [lock, f"{lock}:waiting"], [store._channel, _lock_name(key)]
    while not stop.is_set():
        outcome, token, *_ = await run("acquire", acquire_keys, [name, TTL_MS, 0])
        renewed, *_ = await run("keep_alive", keep_keys, [name, TTL_MS, 0])
        released = await run("release", release_keys, [name, str(token), *published])
        if outcome != 1 or renewed != token or released != 1:
            raise RuntimeError(f"{name}: unexpected replies {outcome} {renewed} {released}")
        counts[0] += 3


async def measure(path: str, url: str, pid: int, clients: int, duration: float) -> Sample:
    run, store, redis_py = redis_py_runner(url)
    pipe: RedisPipe | None = None
    if path == "pipe":
        run, pipe = pipe_runner(url, store)
    counts, stop = [0], asyncio.Event()
    tasks = [
        asyncio.create_task(client(run, store, f"client-{i}", counts, stop)) for i in range(clients)
    ]
    try:
        await asyncio.sleep(WARMUP_S)
        ops, cpu, wall = counts[0], time.process_time(), time.perf_counter()
        redis_cpu = cpu_seconds([pid])
        await asyncio.sleep(duration)
        ops, cpu = counts[0] - ops, time.process_time() - cpu
        redis_cpu = cpu_seconds([pid]) - redis_cpu
        wall = time.perf_counter() - wall
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if pipe is not None:
            await pipe.close()
        await redis_py.aclose(close_connection_pool=True)
        await store.close()
    return Sample(ops / wall, cpu / ops * 1e6, redis_cpu / ops * 1e6)


def spread(values: list[float], digits: int) -> str:
    return (
        f"{statistics.median(values):,.{digits}f} "
        f"[{min(values):,.{digits}f} - {max(values):,.{digits}f}]"
    )


def run_all(args: argparse.Namespace, server: RedisProcess) -> dict[str, list[Sample]]:
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    else:
        loop_factory = asyncio.new_event_loop
    samples: dict[str, list[Sample]] = {path: [] for path in PATHS}
    assert server.process is not None
    pid = server.process.pid
    for number in range(args.runs):
        for path in PATHS:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                measured = measure(path, server.url, pid, args.clients, args.duration)
                sample = runner.run(measured)
            samples[path].append(sample)
            print(
                f"run {number + 1} {path}: {sample.ops_per_s:,.0f} ops/s, "
                f"{sample.cpu_us_per_op:.1f} CPU us/op, "
                f"redis-server {sample.redis_cpu_us_per_op:.1f} CPU us/op",
                file=sys.stderr,
            )
    return samples


def table(samples: dict[str, list[Sample]]) -> str:
    lines = [
        "| path | ops/s | client CPU us/op | redis-server CPU us/op |",
        "|---|---:|---:|---:|",
    ]
    for path, runs in samples.items():
        ops = spread([sample.ops_per_s for sample in runs], 0)
        cpu = spread([sample.cpu_us_per_op for sample in runs], 1)
        redis_cpu = spread([sample.redis_cpu_us_per_op for sample in runs], 1)
        lines.append(f"| {path} | {ops} | {cpu} | {redis_cpu} |")
    old, new = samples["redis-py"], samples["pipe"]

    def median(runs: list[Sample], field: str) -> float:
        return statistics.median(getattr(sample, field) for sample in runs)

    lines.append("")
    lines.append(
        f"pipe / redis-py: {median(new, 'ops_per_s') / median(old, 'ops_per_s'):.2f}x ops/s, "
        f"{median(new, 'cpu_us_per_op') / median(old, 'cpu_us_per_op'):.2f}x CPU per op"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.redis_client_path", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=50, help="concurrent asyncio tasks")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per path")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.runs < 1:
        parser.error("--clients and --runs must be at least 1, --duration positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with RedisProcess() as redis_server:
        samples = run_all(args, redis_server)
    print(
        f"\n{args.clients} tasks on {args.loop}, {args.duration:g} s x {args.runs} runs per "
        f"path; {os.cpu_count()} CPUs shared with redis-server; medians [min - max]\n"
    )
    print(table(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
