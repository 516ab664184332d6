"""What Linux `/proc` says about the processes a benchmark runs: their descendants, their
CPU seconds, their sockets, and which process is the redis-server behind a URL; and the
CPU each role (client, server, redis) used over a window, per call.

Every reading is a few small file reads, cheap enough to take at a window's edges while
the load runs. A process that ends between two readings is skipped, not an error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from pathlib import Path

import redis.asyncio as aioredis

TICK = os.sysconf("SC_CLK_TCK")  # /proc counts CPU time in these ticks (10 ms with 100)
# CPU seconds used so far, by role ("client", "server", "redis"); None: its pid is unknown
CpuReading = dict[str, float | None]
CpuProbe = Callable[[], CpuReading]


def children(pid: int) -> list[int]:
    """The running children of process `pid`."""
    found = []
    for listed in Path(f"/proc/{pid}/task").glob("*/children"):
        with suppress(OSError):  # the thread ended
            found += [int(child) for child in listed.read_text().split()]
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants that are still running."""
    found = [pid]
    for parent in found:
        found += children(parent)
    return found


def command(pid: int) -> bytes:
    """Process `pid`'s command line, arguments separated by spaces; empty once it ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by the running processes `pids`."""
    used = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used += int(fields[11]) + int(fields[12])
    return used / TICK


def machine_busy() -> float:
    """CPU seconds all cores of the machine spent not idle so far (`/proc/stat`)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / TICK  # minus idle and iowait


def tcp_sockets(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets on local `port` in `state` ("0A" listen, "01" established)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue  # no IPv6
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` has open."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with suppress(OSError):  # closed meanwhile
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    except OSError:
        pass  # the process ended
    return inodes


async def redis_pid(url: str) -> int | None:
    """redis-server's pid, if it runs on this machine where /proc shows it."""
    client = aioredis.Redis.from_url(url)
    try:
        pid = int((await client.info("server"))["process_id"])
    finally:
        await client.aclose()
    # In a container the pid is another namespace's: it names no redis-server here.
    return pid if b"redis-server" in command(pid) else None


# -- CPU by role over a window ---------------------------------------------------------


def cpu_probe(
    server: int | None,
    redis: int | Sequence[int] | None,
    on_redis: bool,
    replicas: Sequence[int] = (),
) -> CpuProbe:
    """Reads the CPU seconds of this process (`client`), of the `server` process tree
    (`server`, unless None: the calls run in this process) and, `on_redis`, of
    redis-server (`redis`: the sum over several pids, a cluster's primaries; None when
    its pid is unknown), and of a cluster's `replicas` apart (`redis_replicas`)."""
    redis_pids = [redis] if isinstance(redis, int) else redis

    def read() -> CpuReading:
        used: CpuReading = {"client": time.process_time()}
        if server is not None:
            used["server"] = cpu_seconds(process_tree(server))
        if on_redis:
            used["redis"] = None if redis_pids is None else cpu_seconds(redis_pids)
        if replicas:
            used["redis_replicas"] = cpu_seconds(replicas)
        return used

    return read


def cpu_used(before: CpuReading, after: CpuReading) -> CpuReading:
    """CPU seconds used between two readings, by role (None where either is unknown)."""
    used: CpuReading = {}
    for role, now in after.items():
        then = before.get(role)
        used[role] = None if now is None or then is None else now - then
    return used


def per_call_us(used: float | None, calls: int) -> float | None:
    """CPU seconds `used` as µs per call; None when unknown or without calls."""
    return None if used is None or not calls else used / calls * 1e6


def cpu_per_call(cpu_s: CpuReading, calls: int) -> dict[str, float | None]:
    """CPU µs per call by role, and their `total` (None when a role's is unknown)."""
    per_call = {role: per_call_us(used, calls) for role, used in cpu_s.items()}
    known = [value for value in per_call.values() if value is not None]
    if per_call:
        per_call["total"] = sum(known) if len(known) == len(per_call) else None
    return per_call
