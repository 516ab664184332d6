"""The load loop: N clients doing acquire -> keep-alive -> release cycles for a fixed time.

One run of `run_cell` is one table row. Clients connect first, then loop through a
warm-up and the measured window; only calls that complete inside the window count
towards rates and latencies. After the window each client finishes its current
cycle (every call has a deadline) and stops; a guard timeout cancels whatever is left.
Given a `CpuProbe`, a task reads CPU seconds at the window's start and end (timers on
the same event loop, no work per call: `cpu_in_window`), so CPU per call covers the
calls counted.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from benchmarks.proc import CpuProbe, CpuReading, cpu_per_call, cpu_used
from benchmarks.targets import Session, Target
from quorum_quest.errors import ServiceUnavailable
from quorum_quest.stores import LockKey

OPERATIONS = ("acquire", "keep_alive", "release")
SCENARIOS = ("distinct", "contended")
ERROR_BACKOFF_S = 0.01  # after a failed call, so a broken target is not hammered in a spin


@dataclass(frozen=True, slots=True)
class LoadSettings:
    duration: float  # seconds measured
    warmup: float  # seconds run before measuring
    timeout: float  # seconds per call


@dataclass(frozen=True, slots=True)
class Window:
    """The measured interval, in `time.perf_counter()` seconds."""

    start: float
    end: float

    def __contains__(self, moment: float) -> bool:
        return self.start <= moment <= self.end

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Tally:
    """What all clients of one cell observed; errors count for the whole cell, not the window."""

    window: Window
    latencies_ms: dict[str, list[float]] = field(
        default_factory=lambda: {op: [] for op in OPERATIONS}
    )
    cycles: int = 0  # acquire granted, keep-alive renewed, release released
    attempts: int = 0  # acquire calls answered, granted or not
    errors: Counter[str] = field(default_factory=Counter)  # raised: "<op>:<kind>"
    lost: Counter[str] = field(default_factory=Counter)  # refused although the client held it
    cpu_s: CpuReading = field(default_factory=dict)  # used in the window, by role

    async def call(self, op: str, answer: Awaitable[bool]) -> bool | None:
        """Await one operation and time it; None when it raised."""
        started = time.perf_counter()
        try:
            result = await answer
        except Exception as exc:  # noqa: BLE001 - every failure is a data point
            self.errors[f"{op}:{error_kind(exc)}"] += 1
            return None
        ended = time.perf_counter()
        if ended in self.window:
            self.latencies_ms[op].append((ended - started) * 1000)
        return result

    def now_in_window(self) -> bool:
        return time.perf_counter() in self.window


def error_kind(exc: BaseException) -> str:
    """A short label: the gRPC status name, TIMEOUT, or the exception's class name."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, ServiceUnavailable) and isinstance(exc.code, grpc.StatusCode):
        return exc.code.name  # the SDK's error (redis-sdk), carrying the gRPC status
    if isinstance(exc, TimeoutError):
        return "TIMEOUT"
    return type(exc).__name__


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank percentile, or None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


async def run_cycle(session: Session, key: LockKey, client_id: str, tally: Tally) -> None:
    """acquire -> keep-alive -> release; a refused acquire is an attempt only."""
    granted = await tally.call("acquire", session.acquire(key, client_id))
    if granted is None:
        await asyncio.sleep(ERROR_BACKOFF_S)
        return
    counted = tally.now_in_window()  # a cycle belongs to the window its acquire answered in
    if counted:
        tally.attempts += 1
    if not granted:
        return
    # Release even after a failed keep-alive, so a contended lock is not left held.
    renewed = await tally.call("keep_alive", session.keep_alive(key, client_id))
    released = await tally.call("release", session.release(key, client_id))
    if renewed is False:
        tally.lost["keep_alive"] += 1
    if released is False:
        tally.lost["release"] += 1
    if counted and renewed and released:
        tally.cycles += 1
    if renewed is None or released is None:
        await asyncio.sleep(ERROR_BACKOFF_S)


async def run_client(session: Session, key: LockKey, client_id: str, tally: Tally) -> None:
    """Cycle until the window ends."""
    while time.perf_counter() < tally.window.end:
        await run_cycle(session, key, client_id, tally)


def lock_keys(scenario: str, clients: int, cell_id: str) -> list[LockKey]:
    """One lock per client (distinct) or one lock for all (contended), unique to the cell."""
    if scenario == "distinct":
        return [LockKey("qq-bench", f"{cell_id}-{i}") for i in range(clients)]
    if scenario == "contended":
        return [LockKey("qq-bench", f"{cell_id}-shared")] * clients
    raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")


async def open_sessions(target: Target, clients: int, tally: Tally) -> list[Session]:
    """Connect every client before the clock starts; a failed connect is an error."""
    opened = await asyncio.gather(
        *(target.open_session() for _ in range(clients)), return_exceptions=True
    )
    sessions: list[Session] = []
    for item in opened:
        if isinstance(item, BaseException):
            tally.errors[f"connect:{error_kind(item)}"] += 1
        else:
            sessions.append(item)
    return sessions


async def drive(
    sessions: list[Session], keys: list[LockKey], cell_id: str, tally: Tally, guard: float
) -> None:
    """Run every client; cancel the stragglers after `guard` seconds."""
    loops = [
        run_client(session, key, f"{cell_id}-client-{i}", tally)
        for i, (session, key) in enumerate(zip(sessions, keys, strict=True))
    ]
    try:
        async with asyncio.timeout(guard):
            await asyncio.gather(*loops)
    except TimeoutError:
        tally.errors["harness:guard-timeout"] += 1


async def cpu_in_window(window: Window, probe: CpuProbe) -> CpuReading:
    """What `probe` reads at the window's end minus at its start, sleeping until each."""
    await asyncio.sleep(window.start - time.perf_counter())
    before = probe()
    await asyncio.sleep(window.end - time.perf_counter())
    return cpu_used(before, probe())


async def run_cell(
    target: Target, scenario: str, clients: int, settings: LoadSettings, probe: CpuProbe
) -> dict[str, Any]:
    """One (target, scenario, clients) measurement, summarised."""
    tally = await measure(target, scenario, clients, settings, probe=probe)
    return summarize(target.name, scenario, clients, tally)


async def measure(
    target: Target,
    scenario: str,
    clients: int,
    settings: LoadSettings,
    window_start: Callable[[], Awaitable[float]] | None = None,
    probe: CpuProbe | None = None,
) -> Tally:
    """Connect `clients` clients, then run them through the warm-up and the window.

    `window_start`, awaited once the clients are connected, gives the window's start
    (`time.perf_counter()`); the clients run from then on. Default: now + the warm-up.
    With a `probe`, the tally has the CPU seconds used in the window.
    """
    cell_id = f"{target.name}-{scenario}-{clients}-{uuid.uuid4().hex[:8]}"
    keys = lock_keys(scenario, clients, cell_id)
    tally = Tally(Window(0.0, 0.0))
    sessions = await open_sessions(target, clients, tally)
    try:
        if window_start is None:
            start = time.perf_counter() + settings.warmup
        else:
            start = await window_start()
        tally.window = Window(start, start + settings.duration)
        guard = start - time.perf_counter() + settings.duration + 3 * settings.timeout + 5
        async with asyncio.TaskGroup() as group:
            reading = None
            if probe is not None:
                reading = group.create_task(cpu_in_window(tally.window, probe))
            await drive(sessions, keys, cell_id, tally, guard)
        if reading is not None:
            tally.cpu_s = reading.result()
    finally:
        await asyncio.gather(*(session.close() for session in sessions), return_exceptions=True)
    return tally


def summarize(target: str, scenario: str, clients: int, tally: Tally) -> dict[str, Any]:
    seconds = tally.window.duration
    latencies = tally.latencies_ms
    calls = sum(len(samples) for samples in latencies.values())
    return {
        "target": target,
        "scenario": scenario,
        "clients": clients,
        "duration_s": seconds,
        "cycles_per_s": tally.cycles / seconds,
        "attempts_per_s": tally.attempts / seconds,
        "calls": calls,
        "calls_per_s": calls / seconds,
        "latency_ms": {
            op: {
                "count": len(samples),
                "p50": percentile(samples, 50),
                "p99": percentile(samples, 99),
            }
            for op, samples in latencies.items()
        },
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "lost": dict(tally.lost),
        "cpu_s": tally.cpu_s,
        "cpu_us_per_call": cpu_per_call(tally.cpu_s, calls),
    }
