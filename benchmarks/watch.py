"""The watch mode: how soon a change reaches a WatchLeaders stream on another instance,
and what many idle streams cost one instance.

uv run python -m benchmarks.run --mode watch [--cycles 300] [--pause 0.02] [--watchers 3]
    [--streams 10000] [--watch-on locks,service] [--step 1000] [--load-processes 2]
    [--per-channel 100] [--idle 10] [--changes N] [--rounds 1]
    [--redis-url redis://127.0.0.1:6379/0] [--results-dir DIR]

(the same as `python -m benchmarks.watch` with those options; `python -m benchmarks.watch
streams ...` is the load process of the second part). Every service instance runs as its
own process on one Redis (`benchmarks.targets.service_target`); Redis is a throw-away
redis-server unless --redis-url names one on 127.0.0.1. Each round runs both parts.

**Change latency across instances.** Two service instances A and B on the same Redis
and key prefix. `--watchers` SDK clients (`QuorumQuestClient.watch()`, in this process)
watch one lock through B; a writer (raw stub, its own channel) cycles acquire -> release
of that lock through A `--cycles` times, pausing `--pause` s after each answer. For each
change the writer stamps `time.monotonic()` just before sending and when the answer
comes; each watcher stamps each change as the SDK yields it. So per change and watcher:
*answer -> seen* (can be negative: B may hear Redis's PUBLISH before A's answer reaches
the writer) and *sent -> seen*, the upper bound, which the target (≤ 50 ms p99) is
judged on.

**Many idle streams.** One instance. Its CPU seconds (user + system, its process tree,
`/proc`) and RSS are read over an `--idle`-second window with no stream open; then
`--load-processes` processes open `--streams` WatchLeaders streams in all on the raw
stub (`--per-channel` streams per grpc.aio channel, each channel its own TCP
connection), `--step` at a time in all (a step is opened, then each of its streams waits
for its first message, then the next step: grpc cancels calls opened in too large a
burst), and the same window is read again with every stream open and nothing changing.
Extra CPU = the difference, as a share of one core; the target is ≤ 15 % of one core.
Then the harness makes changes and every stream checks that it saw each one (or was
told `gap`):

- `--watch-on locks`: stream i watches lock `lock-<i>` (N distinct locks); the changes are
  `--changes` acquire -> release cycles of every one of the N locks (20 writer tasks);
- `--watch-on service`: every stream watches the whole service (no lock named); one lock
  of the service is held for the whole part (each stream's first message is its
  CURRENT, which says the stream is open), and the changes are `--changes` cycles of
  another lock, so each change is sent to all N streams.

A change counts as *seen* when a stream received it (granted with its fencing token;
released right after that token), *covered by a gap* when it was not received but a
later message of the stream came with `gap`, else *lost*; the streams wait up to
`--deliver-timeout` s after the last change. The delay of each delivery (writer's answer
-> load process's receipt, CLOCK_MONOTONIC in both processes) is pooled in buckets of
0.1 ms (1 ms above 100 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from benchmarks.core import (
    add_redis_url,
    command_line,
    environment,
    loads,
    mode_parser,
    publish,
    quiet_logging,
    redis_for,
)
from benchmarks.proc import cpu_seconds, process_tree, redis_pid
from benchmarks.targets import (
    CLIENT_CHANNEL_OPTIONS,
    REPO_ROOT,
    delete_keys,
    service_target,
)
from quorum_quest._rpc import LeaderElectionStub, wire

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODE = "watch"
RPC_TIMEOUT_S = 5.0
SERVICE = "qq-watch-bench"
LATENCY_LOCK = "latency"
ANCHOR_LOCK = "anchor"  # held through the service part: each stream's first message
CHANGING_LOCK = "changing"  # the lock the service part's changes cycle
TTL_MS = 10_000  # no lease expires during a cycle
ANCHOR_TTL_MS = 60_000  # the service's maxTtl; renewed every 15 s
WRITERS = 20  # concurrent writer tasks for the changes of `--watch-on locks`
OPEN_TIMEOUT_S = 120.0  # a step of streams until each has its first message
FORMS = ("locks", "service")
KINDS = {1: "current", 2: "granted", 3: "released", 4: "expired", 5: "lost"}
Received = tuple[str, int, bool, float]  # kind, fencing token, gap, time.monotonic()


@dataclass(frozen=True, slots=True)
class WatchSettings:
    cycles: int
    pause: float
    watchers: int
    streams: int
    forms: tuple[str, ...]
    step: int
    load_processes: int
    per_channel: int
    idle: float
    changes: int | None  # None: 1 per lock (locks), 10 (service)
    deliver_timeout: float
    rounds: int

    def changes_for(self, form: str) -> int:
        return self.changes if self.changes is not None else (1 if form == "locks" else 10)

    def shares(self) -> list[int]:
        base, extra = divmod(self.streams, self.load_processes)
        return [base + (i < extra) for i in range(self.load_processes)]


# -- matching what was changed with what a stream received -----------------------------


def match(
    expected: Sequence[Sequence[Any]], received: Sequence[Received]
) -> tuple[dict[int, float], int, int, int]:
    """Which of `expected` ([kind, token, sent, answered] in order) a stream received.

    Returns (index -> receipt time, covered by a gap, lost, unexpected messages). A
    release is matched to the token the stream last saw granted (RELEASED carries no
    token); a change not received is covered when a later one came with `gap`. A
    release with `gap` is a state the service sent in place of unsent ones (or, as a
    CURRENT with `gap`, a resumed stream's): it stands for the latest release sent
    before it was received; a CURRENT with `gap` and a holder for a grant of its token.
    """
    index = {(kind, token): i for i, (kind, token, *_) in enumerate(expected)}
    got: dict[int, float] = {}
    latest_gap = -1
    unexpected = 0
    last = 0
    matched = -1  # the latest change matched
    for kind, token, gap, at in received:
        if kind == "current" and not gap:
            last = token
            continue
        if kind == "current":  # a resumed stream: the state now, changed meanwhile
            kind = "granted" if token else "released"
        if kind == "granted":
            last = token
        else:
            token, last = last, 0
        i = index.get((kind, token))
        if gap and kind != "granted":
            # The state now, which the service sent in place of unsent ones: the latest
            # release sent before it was received.
            later = range(matched + 1, len(expected))
            sent = [j for j in later if expected[j][0] == kind and expected[j][2] < at]
            i = sent[-1] if sent else i
        if i is None:
            unexpected += 1
            continue
        matched = max(matched, i)
        if gap:
            latest_gap = max(latest_gap, i)
        got.setdefault(i, at)
    missing = [i for i in range(len(expected)) if i not in got]
    covered = sum(i < latest_gap for i in missing)
    return got, covered, len(missing) - covered, unexpected


def nearest_rank(values: list[float], share: float) -> float | None:
    if not values:
        return None
    values.sort()
    return values[max(0, math.ceil(share * len(values)) - 1)]


def spread_ms(values: list[float]) -> dict[str, float | None]:
    """count, p50, p99, max of `values` (seconds) in ms."""
    p50, p99 = nearest_rank(values, 0.50), nearest_rank(values, 0.99)
    return {
        "count": len(values),
        "p50": None if p50 is None else p50 * 1000,
        "p99": None if p99 is None else p99 * 1000,
        "max": max(values) * 1000 if values else None,
    }


def from_buckets(buckets: Counter[int]) -> dict[str, float | None]:
    """count, p50, p99, max (ms) of delays pooled in `bucket`s."""
    total = sum(buckets.values())
    found: dict[str, float | None] = {"count": total, "p50": None, "p99": None, "max": None}
    if not total:
        return found
    ordered = sorted(buckets.items())
    for name, share in (("p50", 0.50), ("p99", 0.99)):
        rank, seen = max(1, math.ceil(share * total)), 0
        for bucket, n in ordered:
            seen += n
            if seen >= rank:
                found[name] = bucket / 10
                break
    found["max"] = ordered[-1][0] / 10
    return found


# -- the writer -------------------------------------------------------------------------


class Writer:
    """Acquires and releases locks of `SERVICE` on the raw stub, stamping each change."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)
        self._stub = LeaderElectionStub(self._channel, wire)

    async def cycle(self, domain: str, client_id: str, ttl_ms: int = TTL_MS) -> list[list[Any]]:
        """One acquire -> release: [kind, token, sent, answered] of each change."""
        sent = time.monotonic()
        reply = await self._stub.try_acquire_lock(
            wire.TryAcquireLockRequest(
                service=SERVICE, domain=domain, client_id=client_id, ttl_ms=ttl_ms
            ),
            timeout=RPC_TIMEOUT_S,
        )
        answered = time.monotonic()
        if not reply.is_leader:
            raise RuntimeError(f"{domain} was not granted to the writer")
        granted = ["granted", reply.fencing_token, sent, answered]
        released = await self.release(domain, client_id)
        return [granted, ["released", reply.fencing_token, *released]]

    async def acquire(self, domain: str, client_id: str, ttl_ms: int) -> int:
        reply = await self._stub.try_acquire_lock(
            wire.TryAcquireLockRequest(
                service=SERVICE, domain=domain, client_id=client_id, ttl_ms=ttl_ms
            ),
            timeout=RPC_TIMEOUT_S,
        )
        return int(reply.fencing_token) if reply.is_leader else 0

    async def keep_alive(self, domain: str, client_id: str, ttl_ms: int) -> None:
        await self._stub.keep_alive(
            wire.KeepAliveRequest(
                service=SERVICE, domain=domain, client_id=client_id, ttl_ms=ttl_ms
            ),
            timeout=RPC_TIMEOUT_S,
        )

    async def release(self, domain: str, client_id: str) -> tuple[float, float]:
        sent = time.monotonic()
        reply = await self._stub.release_lock(
            wire.ReleaseLockRequest(service=SERVICE, domain=domain, client_id=client_id),
            timeout=RPC_TIMEOUT_S,
        )
        answered = time.monotonic()
        if not reply.released:
            raise RuntimeError(f"{domain} was not released")
        return sent, answered

    async def close(self) -> None:
        await self._channel.close()


# -- part 1: change latency across instances --------------------------------------------


async def latency_round(settings: WatchSettings, redis_url: str) -> dict[str, Any]:
    from quorum_quest import QuorumQuestClient

    key_prefix = f"qq-bench-watch-{uuid.uuid4().hex[:8]}"
    store = {"url": redis_url, "key_prefix": key_prefix}
    received: list[list[Received]] = [[] for _ in range(settings.watchers)]
    try:
        async with (
            service_target("watch-a", "redis", store, RPC_TIMEOUT_S) as a,
            service_target("watch-b", "redis", store, RPC_TIMEOUT_S) as b,
            AsyncExitStack() as stack,
        ):
            clients = [
                await stack.enter_async_context(
                    QuorumQuestClient(SERVICE, LATENCY_LOCK, 10, b.address, tls=False, token="")
                )
                for _ in range(settings.watchers)
            ]

            async def follow(client: QuorumQuestClient, out: list[Received]) -> None:
                async for change in client.watch():
                    out.append((change.kind, change.fencing_token, change.gap, time.monotonic()))

            tasks = [
                asyncio.create_task(follow(c, out))
                for c, out in zip(clients, received, strict=True)
            ]
            try:
                await until(lambda: all(received), 10.0)  # every watcher has its CURRENT
                writer = Writer(a.address)
                expected: list[list[Any]] = []
                try:
                    for _ in range(settings.cycles):
                        granted, released = await writer.cycle(LATENCY_LOCK, "writer")
                        expected += [granted, released]
                        await asyncio.sleep(settings.pause)
                finally:
                    await writer.close()
                wanted = 1 + len(expected)
                await until(lambda: all(len(out) >= wanted for out in received), 5.0)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await delete_keys(redis_url, key_prefix)
    after_answer: list[float] = []
    after_send: list[float] = []
    covered = lost = unexpected = 0
    for n, out in enumerate(received):
        got, gaps, missing, extra = match(expected, out)
        covered, lost, unexpected = covered + gaps, lost + missing, unexpected + extra
        if missing or extra:
            flagged = [entry[:3] for entry in out if entry[2]]
            absent = [i for i in range(len(expected)) if i not in got]
            print(
                f"watcher {n}: {missing} lost, {gaps} covered by a gap, {extra} unmatched; "
                f"received with gap: {flagged}; not received (index, kind, token): "
                f"{[(i, *expected[i][:2]) for i in absent]} of {len(expected)}; the last "
                f"received: {[entry[:3] for entry in out[-4:]]}",
                file=sys.stderr,
            )
        for i, at in got.items():
            after_send.append(at - expected[i][2])
            after_answer.append(at - expected[i][3])
    return {
        "changes": len(expected),
        "watchers": settings.watchers,
        "deliveries": len(after_send),
        "sent_to_seen_ms": spread_ms(after_send),
        "answer_to_seen_ms": spread_ms(after_answer),
        "covered_by_gap": covered,
        "lost": lost,
        "unexpected": unexpected,
    }


async def until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# -- part 2: many idle streams -----------------------------------------------------------


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of `pids` (VmRSS), summed."""
    total = 0
    for pid in pids:
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


async def window(
    service_pid: int, loaders: Sequence[int], redis: int | None, seconds: float
) -> dict[str, Any]:
    """CPU seconds by role over `seconds`, and the service's RSS at the end."""

    def read() -> dict[str, float]:
        used = {"service": cpu_seconds(process_tree(service_pid))}
        used["load"] = cpu_seconds(loaders)
        if redis is not None:
            used["redis"] = cpu_seconds([redis])
        return used

    before, started = read(), time.monotonic()
    await asyncio.sleep(seconds)
    after, elapsed = read(), time.monotonic() - started
    return {
        "seconds": elapsed,
        "cpu_s": {role: after[role] - before[role] for role in after},
        "core_share": {role: (after[role] - before[role]) / elapsed for role in after},
        "service_rss_mb": rss_bytes(process_tree(service_pid)) / 2**20,
    }


async def streams_round(settings: WatchSettings, form: str, redis_url: str) -> dict[str, Any]:
    key_prefix = f"qq-bench-watch-{uuid.uuid4().hex[:8]}"
    store = {"url": redis_url, "key_prefix": key_prefix}
    redis = await redis_pid(redis_url)
    loaders: list[asyncio.subprocess.Process] = []
    row: dict[str, Any] = {"form": form, "streams": settings.streams}
    try:
        async with service_target("watch-streams", "redis", store, RPC_TIMEOUT_S) as target:
            assert target.pid is not None
            await asyncio.sleep(1.0)  # past the start-up
            row["no_streams"] = await window(target.pid, [], redis, settings.idle)
            writer = Writer(target.address)
            anchor: asyncio.Task[None] | None = None
            anchor_failures = Counter[str]()  # renewals of the anchor that failed
            try:
                if form == "service":
                    held = asyncio.Event()
                    anchor = asyncio.create_task(hold_anchor(writer, held, anchor_failures))
                    await asyncio.wait_for(held.wait(), RPC_TIMEOUT_S)
                loaders, opened = await open_streams(settings, form, target.address)
                row["open_s"] = opened["open_s"]
                row["opened"] = opened["opened"]
                await asyncio.sleep(2.0)  # let the last step settle
                pids = [process.pid for process in loaders]
                row["with_streams"] = await window(target.pid, pids, redis, settings.idle)
                started = time.monotonic()
                before = cpu_seconds(process_tree(target.pid))
                expected = await make_changes(writer, settings, form)
                row["change_s"] = time.monotonic() - started
                row["change_service_cpu_s"] = cpu_seconds(process_tree(target.pid)) - before
                row["check"] = await check(loaders, expected, settings.deliver_timeout)
                row["changes"] = sum(len(entries) for entries in expected.values())
            finally:
                if anchor is not None:
                    anchor.cancel()
                    await asyncio.gather(anchor, return_exceptions=True)
                    row["anchor_renewal_failures"] = dict(anchor_failures)
                await writer.close()
    finally:
        for process in loaders:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await delete_keys(redis_url, key_prefix)
    base = row["no_streams"]["core_share"]["service"]
    row["extra_core_share"] = row["with_streams"]["core_share"]["service"] - base
    return row


async def hold_anchor(writer: Writer, held: asyncio.Event, failures: Counter[str]) -> None:
    """Hold ANCHOR_LOCK, renewed every 15 s (a failed renewal is counted and retried
    after 5 s), until cancelled (then released)."""
    if not await writer.acquire(ANCHOR_LOCK, "anchor", ANCHOR_TTL_MS):
        raise RuntimeError("the anchor lock was not granted")
    held.set()
    try:
        while True:
            await asyncio.sleep(15)
            while True:
                try:
                    await writer.keep_alive(ANCHOR_LOCK, "anchor", ANCHOR_TTL_MS)
                    break
                except grpc.aio.AioRpcError as exc:
                    failures[exc.code().name] += 1
                    await asyncio.sleep(5)
    finally:
        with suppress(Exception):
            await asyncio.shield(writer.release(ANCHOR_LOCK, "anchor"))


async def open_streams(
    settings: WatchSettings, form: str, address: str
) -> tuple[list[asyncio.subprocess.Process], dict[str, Any]]:
    """Start the load processes; each opens its share, then says `ready <opened>`."""
    step = max(1, math.ceil(settings.step / settings.load_processes))
    loaders = []
    first = 0
    for share in settings.shares():
        command = [sys.executable, "-m", "benchmarks.watch", "streams", "--address", address]
        command += ["--form", form, "--first", str(first), "--count", str(share)]
        command += ["--step", str(step), "--per-channel", str(settings.per_channel)]
        command += ["--deliver-timeout", str(settings.deliver_timeout)]
        loaders.append(
            await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=REPO_ROOT,
            )
        )
        first += share
    started = time.monotonic()
    opened = 0
    for process in loaders:
        assert process.stdout is not None
        limit = OPEN_TIMEOUT_S * math.ceil(settings.streams / settings.step)
        line = await asyncio.wait_for(process.stdout.readline(), limit)
        if not line.startswith(b"ready "):
            raise RuntimeError(f"a load process did not open its streams ({line!r})")
        opened += int(line.split()[1])
    return loaders, {"opened": opened, "open_s": time.monotonic() - started}


async def make_changes(
    writer: Writer, settings: WatchSettings, form: str
) -> dict[str, list[list[Any]]]:
    """The changes, per lock: [kind, token, sent, answered] each, in order."""
    cycles = settings.changes_for(form)
    if form == "service":
        entries: list[list[Any]] = []
        for _ in range(cycles):
            entries += await writer.cycle(CHANGING_LOCK, "writer")
        return {CHANGING_LOCK: entries}
    expected: dict[str, list[list[Any]]] = {f"lock-{i}": [] for i in range(settings.streams)}
    queue = [domain for _ in range(cycles) for domain in expected]
    queue.reverse()

    async def work() -> None:
        while queue:
            domain = queue.pop()
            expected[domain] += await writer.cycle(domain, "writer")

    await asyncio.gather(*(work() for _ in range(WRITERS)))
    return expected


async def check(
    loaders: Sequence[asyncio.subprocess.Process],
    expected: dict[str, list[list[Any]]],
    timeout: float,
) -> dict[str, Any]:
    """Each load process's tally of what its streams saw, pooled."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(expected, file)
    try:
        for process in loaders:
            assert process.stdin is not None
            process.stdin.write(f"check {file.name}\n".encode())
            await process.stdin.drain()
        parts = []
        for process in loaders:
            await asyncio.wait_for(process.communicate(), timeout + 60)
            tally = Path(f"{file.name}.{process.pid}")
            parts.append(json.loads(tally.read_text()))
            tally.unlink()
    finally:
        os.unlink(file.name)
    pooled: dict[str, Any] = {
        key: sum(part[key] for part in parts)
        for key in ("streams", "complete", "with_gap", "seen", "covered_by_gap", "lost")
    }
    pooled["unexpected"] = sum(part["unexpected"] for part in parts)
    pooled["broken"] = sum(part["broken"] for part in parts)
    others: Counter[str] = Counter()
    for part in parts:
        others.update(part["other_changes"])
    pooled["other_changes"] = dict(others)
    for name in ("answer_to_seen", "sent_to_seen"):
        buckets: Counter[int] = Counter()
        for part in parts:
            buckets.update({int(k): n for k, n in part[name].items()})
        pooled[f"{name}_ms"] = from_buckets(buckets)
    return pooled


# -- the load process of part 2 -----------------------------------------------------------


async def hold_streams(args: argparse.Namespace) -> dict[str, Any]:
    """Open the streams in steps, say `ready <opened>`, then on `check <file>` wait for
    the changes in the file and tally them."""
    channels: list[grpc.aio.Channel] = []
    stubs: list[LeaderElectionStub] = []
    received: list[list[Received]] = []
    locks: list[str] = []
    broken = Counter[str]()

    others = Counter[str]()  # changes of locks a stream checks nothing of

    async def follow(
        stub: LeaderElectionStub, request: Any, out: list[Received], watched: str
    ) -> None:
        try:
            async for message in stub.watch_leaders(request, wait_for_ready=True):
                kind = KINDS.get(message.kind, "current")
                if kind != "current" and message.domain != watched:
                    others[f"{message.domain}:{kind}"] += 1  # the anchor: never expected
                    continue
                out.append((kind, message.fencing_token, message.gap, time.monotonic()))
        except grpc.aio.AioRpcError as exc:
            broken[exc.code().name] += 1

    tasks = []
    for n in range(args.count):
        if n % args.per_channel == 0:
            channels.append(grpc.aio.insecure_channel(args.address, options=CLIENT_CHANNEL_OPTIONS))
            stubs.append(LeaderElectionStub(channels[-1], wire))
        lock = f"lock-{args.first + n}"
        if args.form == "locks":
            request = wire.WatchLeadersRequest(locks=[{"service": SERVICE, "domain": lock}])
        else:
            request = wire.WatchLeadersRequest(service=SERVICE)
        locks.append(lock)
        received.append([])
        watched = lock if args.form == "locks" else CHANGING_LOCK
        tasks.append(asyncio.create_task(follow(stubs[-1], request, received[-1], watched)))
        if (n + 1) % args.step == 0 or n + 1 == args.count:
            step = received[-((n % args.step) + 1) :]
            if not await until(lambda step=step: all(step) or bool(broken), OPEN_TIMEOUT_S):
                print(f"a step of streams did not open in {OPEN_TIMEOUT_S:g} s", file=sys.stderr)
            if broken:
                print(f"streams broken while opening: {dict(broken)}", file=sys.stderr)
                break
    opened = sum(bool(out) for out in received)
    print(f"ready {opened}", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    path = Path(line.split(None, 1)[1].strip())
    expected: dict[str, list[list[Any]]] = json.loads(path.read_text())
    want = [
        expected.get(lock, []) if args.form == "locks" else expected[CHANGING_LOCK]
        for lock in locks
    ]
    # Every stream: its first message (CURRENT), then each change.
    await until(
        lambda: all(len(out) > len(w) for out, w in zip(received, want, strict=True)),
        args.deliver_timeout,
    )
    tally: dict[str, Any] = {"streams": args.count, "complete": 0, "with_gap": 0, "seen": 0}
    tally |= {"covered_by_gap": 0, "lost": 0, "unexpected": 0}
    answer_to_seen: Counter[int] = Counter()
    sent_to_seen: Counter[int] = Counter()
    for out, wanted in zip(received, want, strict=True):
        # A service stream's first message is the anchor's CURRENT: `match` skips it.
        got, covered, lost, unexpected = match(wanted, out)
        tally["seen"] += len(got)
        tally["covered_by_gap"] += covered
        tally["lost"] += lost
        tally["unexpected"] += unexpected
        tally["complete"] += len(got) == len(wanted)
        tally["with_gap"] += any(entry[2] for entry in out)
        for i, at in got.items():
            answer_to_seen[bucket(at - wanted[i][3])] += 1
            sent_to_seen[bucket(at - wanted[i][2])] += 1
    tally["other_changes"] = dict(others)
    tally["broken"] = sum(broken.values())
    tally["broken_kinds"] = dict(broken)
    tally["answer_to_seen"] = dict(answer_to_seen)
    tally["sent_to_seen"] = dict(sent_to_seen)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(channel.close() for channel in channels))
    # Beside the changes' file: a tally can be larger than a pipe's buffer.
    Path(f"{path}.{os.getpid()}").write_text(json.dumps(tally))
    return tally


def bucket(delay: float) -> int:
    """A delay's bucket in 0.1 ms: 0.1 ms wide below 100 ms, 1 ms wide above."""
    tenths = round(delay * 10_000)
    return tenths if tenths < 1000 else tenths // 10 * 10


def streams_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.watch streams")
    parser.add_argument("--address", required=True)
    parser.add_argument("--form", choices=FORMS, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--per-channel", type=int, required=True)
    parser.add_argument("--deliver-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(hold_streams(args))
    return 0


# -- the rounds, the tables, the files ---------------------------------------------------


async def run_rounds(settings: WatchSettings, redis_url: str) -> list[dict[str, Any]]:
    rounds = []
    for n in range(1, settings.rounds + 1):
        load_before = os.getloadavg()
        latency = await latency_round(settings, redis_url)
        print(latency_line(n, latency), file=sys.stderr, flush=True)
        streams = []
        for form in settings.forms if settings.streams else ():  # --streams 0: part 1 only
            row = await streams_round(settings, form, redis_url)
            print(streams_line(n, row), file=sys.stderr, flush=True)
            streams.append(row)
        load = {"before": load_before, "after": os.getloadavg()}
        rounds.append({"round": n, "load_average": load, "latency": latency, "streams": streams})
    return rounds


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def latency_line(n: int, row: dict[str, Any]) -> str:
    bound = row["sent_to_seen_ms"]
    return (
        f"round {n} latency: {row['deliveries']} deliveries, sent -> seen p50 "
        f"{ms(bound['p50'])} / p99 {ms(bound['p99'])} / max {ms(bound['max'])} ms, "
        f"{row['lost']} lost, {row['covered_by_gap']} covered by a gap"
    )


def streams_line(n: int, row: dict[str, Any]) -> str:
    check = row["check"]
    return (
        f"round {n} {row['streams']} streams on {row['form']}: opened {row['opened']} in "
        f"{row['open_s']:.0f} s, service CPU idle "
        f"{share(row['no_streams']['core_share']['service'])} -> "
        f"{share(row['with_streams']['core_share']['service'])} of a core, RSS "
        f"{row['no_streams']['service_rss_mb']:.0f} -> {row['with_streams']['service_rss_mb']:.0f} "
        f"MB; {row['changes']} changes: {check['complete']}/{check['streams']} streams saw all, "
        f"{check['lost']} lost, {check['covered_by_gap']} covered by a gap, "
        f"{check['broken']} streams broken"
        + (f"; other changes seen: {check['other_changes']}" if check["other_changes"] else "")
        + (
            f"; anchor renewals failed: {failed}"
            if (failed := row.get("anchor_renewal_failures"))
            else ""
        )
    )


def median(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def summarize(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds, totals of lost updates, and whether each target is met."""
    latency = [r["latency"] for r in rounds]
    p99 = median([r["sent_to_seen_ms"]["p99"] for r in latency])
    summary: dict[str, Any] = {
        "latency": {
            "sent_to_seen_ms": {
                name: median([r["sent_to_seen_ms"][name] for r in latency])
                for name in ("p50", "p99", "max")
            },
            "answer_to_seen_ms": {
                name: median([r["answer_to_seen_ms"][name] for r in latency])
                for name in ("p50", "p99", "max")
            },
            "deliveries": sum(r["deliveries"] for r in latency),
            "lost": sum(r["lost"] for r in latency),
            "covered_by_gap": sum(r["covered_by_gap"] for r in latency),
            "target_met": p99 is not None and p99 <= 50 and not sum(r["lost"] for r in latency),
        },
        "streams": {},
    }
    forms = dict.fromkeys(row["form"] for r in rounds for row in r["streams"])
    for form in forms:
        rows = [row for r in rounds for row in r["streams"] if row["form"] == form]
        extra = median([row["extra_core_share"] for row in rows])
        lost = sum(row["check"]["lost"] for row in rows)
        summary["streams"][form] = {
            "streams": rows[0]["streams"],
            "opened": median([row["opened"] for row in rows]),
            "service_core_share_no_streams": median(
                [row["no_streams"]["core_share"]["service"] for row in rows]
            ),
            "service_core_share_with_streams": median(
                [row["with_streams"]["core_share"]["service"] for row in rows]
            ),
            "extra_core_share": extra,
            "service_rss_mb_no_streams": median(
                [row["no_streams"]["service_rss_mb"] for row in rows]
            ),
            "service_rss_mb_with_streams": median(
                [row["with_streams"]["service_rss_mb"] for row in rows]
            ),
            "changes": rows[0]["changes"],
            "deliveries_expected": sum(
                row["check"]["seen"] + row["check"]["covered_by_gap"] + row["check"]["lost"]
                for row in rows
            ),
            "lost": lost,
            "covered_by_gap": sum(row["check"]["covered_by_gap"] for row in rows),
            "broken": sum(row["check"]["broken"] for row in rows),
            "answer_to_seen_p99_ms": median(
                [row["check"]["answer_to_seen_ms"]["p99"] for row in rows]
            ),
            "target_met": extra is not None
            and extra <= 0.15
            and not lost
            and all(row["opened"] == row["streams"] for row in rows),
        }
    return summary


def tables(
    settings: WatchSettings, rounds: Sequence[dict[str, Any]], summary: dict[str, Any]
) -> str:
    met = {True: "**met**", False: "**not met**"}
    lines = [
        "Change latency across instances (writer through instance A, "
        f"{settings.watchers} SDK watchers through instance B, {settings.cycles} acquire -> "
        f"release cycles, {settings.pause * 1000:g} ms pause after each answer). "
        "sent -> seen: from just before the writer sends to the watcher's receipt (the "
        "upper bound; the target is judged on it); answer -> seen: from the writer's answer.\n",
        "| round | load avg before | deliveries | sent -> seen p50 / p99 / max ms | "
        "answer -> seen p50 / p99 / max ms | lost | covered by a gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        row = r["latency"]
        bound, answer = row["sent_to_seen_ms"], row["answer_to_seen_ms"]
        lines.append(
            f"| {r['round']} | {loads(r['load_average']['before'])} | {row['deliveries']} | "
            f"{ms(bound['p50'])} / {ms(bound['p99'])} / {ms(bound['max'])} | "
            f"{ms(answer['p50'])} / {ms(answer['p99'])} / {ms(answer['max'])} | "
            f"{row['lost']} | {row['covered_by_gap']} |"
        )
    latency = summary["latency"]
    bound = latency["sent_to_seen_ms"]
    lines.append(
        f"\nMedian over rounds: sent -> seen p50 {ms(bound['p50'])}, p99 {ms(bound['p99'])}, "
        f"max {ms(bound['max'])} ms; {latency['lost']} lost. Target ≤ 50 ms p99, nothing "
        f"lost: {met[latency['target_met']]}.\n"
    )
    lines += [
        f"Idle streams on one instance: {settings.streams} streams from "
        f"{settings.load_processes} load processes ({settings.per_channel} per channel), "
        f"opened {settings.step} at a time; CPU over {settings.idle:g} s with no stream and "
        "with every stream open, as a share of one core (/proc, the service's process "
        "tree); then the changes, and what every stream saw.\n",
        "| round | watching | opened (s) | service CPU: none -> streams (extra) | "
        "load CPU | redis CPU | service RSS MB | changes (s, service CPU s) | streams saw "
        "all | lost | covered by a gap | broken | answer -> seen p50 / p99 / max ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        for row in r["streams"]:
            none, busy, check = row["no_streams"], row["with_streams"], row["check"]
            delay = check["answer_to_seen_ms"]
            lines.append(
                f"| {r['round']} | {row['form']} | {row['opened']} ({row['open_s']:.0f}) | "
                f"{share(none['core_share']['service'])} -> "
                f"{share(busy['core_share']['service'])} "
                f"({share(row['extra_core_share'])}) | {share(busy['core_share']['load'])} | "
                f"{share(busy['core_share'].get('redis'))} | "
                f"{none['service_rss_mb']:.0f} -> {busy['service_rss_mb']:.0f} | "
                f"{row['changes']} ({row['change_s']:.1f}, {row['change_service_cpu_s']:.1f}) | "
                f"{check['complete']}/{check['streams']} | {check['lost']} | "
                f"{check['covered_by_gap']} | {check['broken']} | "
                f"{ms(delay['p50'])} / {ms(delay['p99'])} / {ms(delay['max'])} |"
            )
    for form, row in summary["streams"].items():
        lines.append(
            f"\n{form}: median extra CPU {share(row['extra_core_share'])} of a core "
            f"({share(row['service_core_share_no_streams'])} -> "
            f"{share(row['service_core_share_with_streams'])}), RSS "
            f"{row['service_rss_mb_no_streams']:.0f} -> "
            f"{row['service_rss_mb_with_streams']:.0f} MB; "
            f"{row['lost']} lost of {row['deliveries_expected']} deliveries, "
            f"{row['covered_by_gap']} covered by a gap. Target ≤ 15 % of a core, nothing lost: "
            f"{met[row['target_met']]}."
        )
    return "\n".join(lines)


def chart(rounds: Sequence[dict[str, Any]]) -> Callable[[Figure], None]:
    def draw(figure: Figure) -> None:
        left, right = figure.subplots(1, 2)
        for r in rounds:
            row = r["latency"]["sent_to_seen_ms"]
            values = [row["p50"], row["p99"], row["max"]]
            left.plot(["p50", "p99", "max"], values, marker="o", label=f"round {r['round']}")
        left.axhline(50, color="red", linestyle="--", label="target p99")
        left.set_ylabel("ms, sent -> seen")
        left.set_title("change latency across instances")
        left.legend()
        labels, none, busy = [], [], []
        for r in rounds:
            for row in r["streams"]:
                labels.append(f"{row['form']} r{r['round']}")
                none.append(row["no_streams"]["core_share"]["service"] * 100)
                busy.append(row["with_streams"]["core_share"]["service"] * 100)
        positions = range(len(labels))
        right.bar([p - 0.2 for p in positions], none, 0.4, label="no streams")
        right.bar([p + 0.2 for p in positions], busy, 0.4, label="streams open")
        right.set_xticks(list(positions), labels, rotation=30)
        right.set_ylabel("service CPU, % of one core (idle)")
        right.set_title("idle streams")
        right.legend()

    return draw


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = mode_parser(MODE, __doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--cycles", type=int, default=300, help="writer cycles (part 1)")
    parser.add_argument("--pause", type=float, default=0.02, help="s after each answer")
    parser.add_argument("--watchers", type=int, default=3, help="SDK watchers (part 1)")
    parser.add_argument(
        "--streams", type=int, default=10_000, help="streams (part 2; 0: part 1 only)"
    )
    parser.add_argument(
        "--watch-on",
        default="locks,service",
        help="locks (a distinct lock per stream) and/or service (every stream the whole service)",
    )
    parser.add_argument("--step", type=int, default=1000, help="streams opened at a time, in all")
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--per-channel", type=int, default=100, help="streams per channel")
    parser.add_argument("--idle", type=float, default=10.0, help="s per idle CPU window")
    parser.add_argument(
        "--changes",
        type=int,
        default=None,
        help="cycles per lock (locks, default 1) or of the one changing lock (service, 10)",
    )
    parser.add_argument("--deliver-timeout", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both parts")
    add_redis_url(parser)
    args = parser.parse_args(argv)
    forms = [form.strip() for form in args.watch_on.split(",") if form.strip()]
    if not forms or set(forms) - set(FORMS):
        parser.error("--watch-on: locks, service or both")
    args.forms = tuple(forms)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["streams"]:
        return streams_main(argv[1:])
    args = parse_args(argv)
    quiet_logging()
    settings = WatchSettings(
        cycles=args.cycles,
        pause=args.pause,
        watchers=args.watchers,
        streams=args.streams,
        forms=args.forms,
        step=args.step,
        load_processes=args.load_processes,
        per_channel=args.per_channel,
        idle=args.idle,
        changes=args.changes,
        deliver_timeout=args.deliver_timeout,
        rounds=args.rounds,
    )
    started = datetime.now(UTC)
    with redis_for(args.redis_url) as redis_url:
        assert redis_url is not None
        rounds = asyncio.run(run_rounds(settings, redis_url))
        env = environment(redis_url)
    env["redis"] = "given" if args.redis_url else "started"
    summary = summarize(rounds)
    text = (
        f"{os.cpu_count()} CPUs shared by every process here (service instances, "
        "redis-server, load processes, this harness) and by whatever else runs on the "
        f"machine; load average (1, 5, 15 min) before each round is in the tables.\n\n"
        + tables(settings, rounds, summary)
    )
    document = {
        "started": started.isoformat(),
        "command": command_line(MODE, argv),
        "settings": {
            "mode": MODE,
            **{key: getattr(settings, key) for key in WatchSettings.__dataclass_fields__},
        },
        "environment": env,
        "watch": {"summary": summary, "rounds": rounds},
    }
    publish(args.results_dir, MODE, "Watch", started, document, text, chart(rounds))
    met = summary["latency"]["target_met"] and all(
        row["target_met"] for row in summary["streams"].values()
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
