"""The workers mode: the service on the Redis store with 1, 2, ... worker processes
(`server.workers`), driven from several load processes.

uv run python -m benchmarks.run --mode workers [--workers 1,2] [--load-processes 2]
    [--clients 50] [--duration 5] [--warmup 0.5] [--timeout 2] [--rounds 3]
    [--redis-url redis://127.0.0.1:6379/0] [--results-dir DIR]

(the same as `python -m benchmarks.workers` with those options); this module is also the
load process: `python -m benchmarks.workers load --address HOST:PORT --clients N
--duration S --timeout S`.

Each run (one worker count in one round) starts the service on a fresh port
(`benchmarks.targets.service_target` with `workers`), then the load processes, each with
its share of the clients. Each client has its own grpc.aio channel (its own TCP
connection, which the kernel hands to one worker: SO_REUSEPORT balances connections, not
calls) and its own lock, and loops acquire -> keep-alive -> release on the raw stub
(`benchmarks.load`, scenario `distinct`). A load process connects its clients, prints
`ready` and waits for `go <t>` on stdin, `t` being the window's start in
`time.monotonic()` (CLOCK_MONOTONIC, the same in every process on Linux), so all load
processes measure the same window; the clients start at `go` (the warm-up). At the end
it prints its tally as one JSON line.

The harness reads, at the window's start and end, the CPU seconds (user + system,
`/proc/<pid>/stat`) of the service's processes (with workers, the supervisor and its
children), of the load processes and of redis-server, and the busy time of the whole
machine (`/proc/stat`); at the start it counts each worker's established connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from benchmarks.core import (
    add_redis_url,
    command_line,
    counts,
    environment,
    loads,
    mode_parser,
    positive,
    publish,
    quiet_logging,
    redis_for,
)
from benchmarks.load import OPERATIONS, LoadSettings, measure, percentile, summarize
from benchmarks.proc import (
    cpu_seconds,
    machine_busy,
    per_call_us,
    process_tree,
    redis_pid,
    socket_inodes,
    tcp_sockets,
)
from benchmarks.report import spread
from benchmarks.targets import REPO_ROOT, ServiceTarget, delete_keys, service_target

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODE = "workers"
LOAD_START_TIMEOUT_S = 30.0  # a load process imports grpc and connects its clients
ROLES = ("service", "load", "redis")  # whose CPU time is read, besides the machine's


@dataclass(frozen=True, slots=True)
class WorkersSettings:
    workers: tuple[int, ...]  # worker counts, run in this order in every round
    load_processes: int
    clients: int  # in all, split over the load processes
    duration: float  # seconds measured per run
    warmup: float  # seconds run before measuring
    timeout: float  # seconds per call
    rounds: int

    def shares(self) -> list[int]:
        """Clients per load process, as even as can be."""
        base, extra = divmod(self.clients, self.load_processes)
        return [base + (i < extra) for i in range(self.load_processes)]


# -- the load process ---------------------------------------------------------------------


async def load(address: str, clients: int, settings: LoadSettings) -> dict[str, Any]:
    """Connect, say `ready`, start at `go`; the tally with every latency in the window."""

    async def window_start() -> float:
        print("ready", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        start = float(line.removeprefix("go "))
        return time.perf_counter() + start - time.monotonic()

    target = ServiceTarget("redis", address, settings.timeout)
    tally = await measure(target, "distinct", clients, settings, window_start)
    return {
        "summary": summarize(target.name, "distinct", clients, tally),
        "latencies_ms": tally.latencies_ms,
    }


def load_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers load")
    parser.add_argument("--address", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    args = parser.parse_args(argv)
    settings = LoadSettings(duration=args.duration, warmup=0.0, timeout=args.timeout)
    print(json.dumps(asyncio.run(load(args.address, args.clients, settings))), flush=True)
    return 0


# -- what the processes use -----------------------------------------------------------------


def sample(service_pid: int, loaders: Sequence[int], redis_pid: int | None) -> dict[str, float]:
    """CPU seconds so far per role (redis only when its process is known), and the machine's."""
    used = {
        "service": cpu_seconds(process_tree(service_pid)),
        "load": cpu_seconds(loaders),
        "machine": machine_busy(),
    }
    if redis_pid:
        used["redis"] = cpu_seconds([redis_pid])
    return used


def connections(service_pid: int, port: int) -> list[int]:
    """Established connections per serving process (one that listens on `port`)."""
    listening, established = tcp_sockets(port, "0A"), tcp_sockets(port, "01")
    per_process = []
    for pid in process_tree(service_pid):
        sockets = socket_inodes(pid)
        if sockets & listening:
            per_process.append(len(sockets & established))
    return per_process


# -- one run ----------------------------------------------------------------------------------


async def ready(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), LOAD_START_TIMEOUT_S)
    if line != b"ready\n":
        raise RuntimeError(f"a load process did not start (exit code {process.returncode})")


async def outcome(process: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    """The load process's JSON line, once it has exited."""
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    if process.returncode != 0:
        raise RuntimeError(f"a load process exited with code {process.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def run_one(
    settings: WorkersSettings, store: dict[str, Any], redis: int | None, workers: int, round_: int
) -> dict[str, Any]:
    """The service with `workers` workers under the load processes: one measured window."""
    async with service_target("redis", "redis", store, settings.timeout, workers=workers) as target:
        assert target.pid is not None
        command = [sys.executable, "-m", "benchmarks.workers", "load", "--address", target.address]
        command += ["--duration", str(settings.duration), "--timeout", str(settings.timeout)]
        loaders = [
            await asyncio.create_subprocess_exec(
                *command,
                *("--clients", str(clients)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=REPO_ROOT,
            )
            for clients in settings.shares()
        ]
        try:
            await asyncio.gather(*(ready(process) for process in loaders))
            start = time.monotonic() + settings.warmup
            for process in loaders:
                assert process.stdin is not None
                process.stdin.write(f"go {start!r}\n".encode())
                await process.stdin.drain()
            pids = [process.pid for process in loaders]
            await asyncio.sleep(start - time.monotonic())
            before = sample(target.pid, pids, redis)
            per_worker = connections(target.pid, int(target.address.rsplit(":", 1)[1]))
            await asyncio.sleep(start + settings.duration - time.monotonic())
            after = sample(target.pid, pids, redis)
            parts = await asyncio.gather(
                *(outcome(process, 3 * settings.timeout + 10) for process in loaders)
            )
        finally:
            for process in loaders:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    cpu = {role: after[role] - before[role] for role in after}
    return merge(parts, settings, workers, round_, cpu, per_worker)


def merge(
    parts: Sequence[dict[str, Any]],
    settings: WorkersSettings,
    workers: int,
    round_: int,
    cpu: dict[str, float],
    per_worker: list[int],
) -> dict[str, Any]:
    """One run's row: the load processes' tallies summed, their latencies pooled."""
    samples = {op: [ms for part in parts for ms in part["latencies_ms"][op]] for op in OPERATIONS}
    pooled = [ms for op in OPERATIONS for ms in samples[op]]
    summaries = [part["summary"] for part in parts]
    errors: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for summary in summaries:
        errors.update(summary["error_kinds"])
        lost.update(summary["lost"])
    return {
        "round": round_,
        "workers": workers,
        "load_processes": len(parts),
        "clients": settings.clients,
        "duration_s": settings.duration,
        "calls": len(pooled),
        "calls_per_s": len(pooled) / settings.duration,
        "cycles_per_s": sum(summary["cycles_per_s"] for summary in summaries),
        "latency_ms": {
            op: {"count": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99)}
            for op, values in {"all": pooled, **samples}.items()
        },
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "lost": dict(lost),
        "connections_per_worker": per_worker,
        "cpu_s": cpu,
    }


def progress_line(row: dict[str, Any]) -> str:
    return (
        f"workers round {row['round']}: {row['workers']} {plural(row['workers'])}, "
        f"{row['calls_per_s']:.0f} calls/s, connections {connections_shown(row)}, "
        f"service {row['cpu_s']['service'] / row['duration_s']:.2f} cores, "
        f"machine {row['cpu_s']['machine'] / row['duration_s']:.2f} cores, "
        f"{row['errors']} errors"
    )


async def run_workers(settings: WorkersSettings, redis_url: str) -> list[dict[str, Any]]:
    """Every worker count in every round, alternating (1, 2, 1, 2, ...), on one Redis."""
    key_prefix = f"qq-bench-{uuid.uuid4().hex[:8]}-workers"
    store = {"url": redis_url, "key_prefix": key_prefix}
    redis = await redis_pid(redis_url)
    rows = []
    try:
        for round_ in range(1, settings.rounds + 1):
            for workers in settings.workers:
                row = await run_one(settings, store, redis, workers, round_)
                print(progress_line(row), file=sys.stderr, flush=True)
                rows.append(row)
    finally:
        await delete_keys(redis_url, key_prefix)
    return rows


# -- the summary and the tables -----------------------------------------------------------


def summarize_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per worker count, over the rounds: medians and ranges, and the ratio to the first count.

    `ratio` is the median calls/s over the first worker count's median; `round_ratios`
    are the same ratio within each round.
    """
    counts = list(dict.fromkeys(row["workers"] for row in rows))
    calls = {(row["workers"], row["round"]): row["calls_per_s"] for row in rows}
    first = [row["calls_per_s"] for row in rows if row["workers"] == counts[0]]
    summary = []
    for workers in counts:
        mine = [row for row in rows if row["workers"] == workers]
        rates = [row["calls_per_s"] for row in mine]
        summary.append(
            {
                "workers": workers,
                "rounds": len(mine),
                "calls_per_s": {
                    "median": statistics.median(rates),
                    "min": min(rates),
                    "max": max(rates),
                },
                "ratio": statistics.median(rates) / statistics.median(first),
                "round_ratios": [
                    row["calls_per_s"] / calls[counts[0], row["round"]]
                    for row in mine
                    if calls.get((counts[0], row["round"]))
                ],
                "p50_ms": median_of(mine, lambda row: row["latency_ms"]["all"]["p50"]),
                "p99_ms": median_of(mine, lambda row: row["latency_ms"]["all"]["p99"]),
                "cpu_us_per_call": {
                    role: median_of(mine, lambda row, role=role: role_per_call(row, role))
                    for role in ROLES
                },
                "cores": {
                    role: median_of(mine, lambda row, role=role: cores(row, role))
                    for role in (*ROLES, "machine")
                },
            }
        )
    return summary


def median_of(
    rows: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
) -> float | None:
    """The median of `value(row)` over the rows where it is known."""
    values = [v for v in map(value, rows) if v is not None]
    return statistics.median(values) if values else None


def cores(row: dict[str, Any], role: str) -> float | None:
    """Cores used on average in the window: CPU seconds ÷ window seconds."""
    used = row["cpu_s"].get(role)
    return None if used is None else used / row["duration_s"]


def role_per_call(row: dict[str, Any], role: str) -> float | None:
    """`role`'s CPU µs per call answered in the window."""
    return per_call_us(row["cpu_s"].get(role), row["calls"])


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plural(workers: int) -> str:
    return "worker" if workers == 1 else "workers"


def connections_shown(row: dict[str, Any]) -> str:
    return "/".join(map(str, row["connections_per_worker"]))


def workers_tables(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]]) -> str:
    """The summary per worker count, then every run, then the runs with errors."""
    base = summary[0]["workers"]
    lines = [
        f"| workers | runs | calls/s median (min–max) | ÷ {base} {plural(base)}: of medians "
        "(per round) | p50 / p99 ms (medians) | CPU µs per call: service / load / redis | "
        "cores busy: service / load / redis / machine |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        rates = [row["calls_per_s"] for row in rows if row["workers"] == s["workers"]]
        rounds = ", ".join(f"{r:.2f}" for r in s["round_ratios"])
        per_call = " / ".join(number(s["cpu_us_per_call"][role], 0) for role in ROLES)
        busy = " / ".join(number(s["cores"][role]) for role in (*ROLES, "machine"))
        lines.append(
            f"| {s['workers']} | {s['rounds']} | {spread(rates)} | "
            f"{s['ratio']:.2f} ({rounds}) | {number(s['p50_ms'])} / {number(s['p99_ms'])} | "
            f"{per_call} | {busy} |"
        )
    lines += [
        "\nRuns, in the order they ran:\n",
        "| round | workers | connections per worker | calls/s | cycles/s | p50 / p99 ms | "
        "CPU µs per call: service / load / redis | cores busy: service / load / redis / "
        "machine | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        latency = row["latency_ms"]["all"]
        per_call = " / ".join(number(role_per_call(row, role), 0) for role in ROLES)
        busy = " / ".join(number(cores(row, role)) for role in (*ROLES, "machine"))
        lines.append(
            f"| {row['round']} | {row['workers']} | {connections_shown(row)} | "
            f"{row['calls_per_s']:.0f} | {row['cycles_per_s']:.0f} | "
            f"{number(latency['p50'])} / {number(latency['p99'])} | {per_call} | {busy} | "
            f"{row['errors'] + sum(row['lost'].values())} |"
        )
    troubled = [row for row in rows if row["errors"] or row["lost"]]
    if troubled:
        lines.append("\nErrors (`<op>:<kind>`; `lost:<op>` = refused although held):\n")
    for row in troubled:
        kinds = {**row["error_kinds"], **{f"lost:{op}": n for op, n in row["lost"].items()}}
        detail = ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items()))
        lines.append(f"- round {row['round']}, {row['workers']} workers: {detail}")
    return "\n".join(lines)


def workers_chart(
    rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], cpus: int
) -> Callable[[Figure], None]:
    """Per worker count: every run's calls/s and the median; the median cores kept busy."""

    def draw(figure: Figure) -> None:
        calls, busy = figure.subplots(1, 2)
        places = range(len(summary))
        labels = [f"{s['workers']} worker{'s' if s['workers'] > 1 else ''}" for s in summary]
        for place, s in zip(places, summary, strict=True):
            rates = [r["calls_per_s"] for r in rows if r["workers"] == s["workers"]]
            run, median = ("run", "median") if place == 0 else (None, None)  # one legend entry
            calls.plot([place] * len(rates), rates, "o", color="C0", label=run)
            width = (place - 0.25, place + 0.25)
            calls.hlines(s["calls_per_s"]["median"], *width, color="C1", label=median)
        calls.set_xticks(places, labels)
        calls.set_xlim(-0.5, len(summary) - 0.5)
        calls.set_ylim(bottom=0)
        calls.set_title("calls/s, all load processes")
        calls.grid(axis="y", alpha=0.3)
        calls.legend(fontsize="small", loc="lower center")
        stacked = [0.0] * len(summary)
        for role in ("service", "load", "redis"):
            values = [s["cores"][role] or 0.0 for s in summary]
            busy.bar(places, values, 0.6, bottom=stacked, label=role)
            stacked = [b + v for b, v in zip(stacked, values, strict=True)]
        machine = [s["cores"]["machine"] or 0.0 for s in summary]
        rest = [max(0.0, m - b) for m, b in zip(machine, stacked, strict=True)]
        busy.bar(places, rest, 0.6, bottom=stacked, color="0.75", label="rest of the machine")
        busy.axhline(cpus, color="C3", linestyle="--", label=f"{cpus} cores")
        busy.set_xticks(places, labels)
        busy.set_title("cores busy in the window (medians)")
        busy.grid(axis="y", alpha=0.3)
        busy.legend(fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))

    return draw


# -- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = mode_parser(MODE, "The service on the Redis store with 1, 2, ... worker processes.")
    parser.add_argument(
        "--workers", type=counts, default=[1, 2], help="server.workers counts; default 1,2"
    )
    parser.add_argument(
        "--load-processes", type=int, default=2, help="load-generating processes; default 2"
    )
    parser.add_argument(
        "--clients", type=counts, default=[50], help="clients in all (one count); default 50"
    )
    parser.add_argument(
        "--duration", type=positive, default=5.0, help="measured seconds per run; default 5"
    )
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds run before measuring")
    parser.add_argument("--timeout", type=positive, default=2.0, help="seconds per call")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of all worker counts; default 3"
    )
    add_redis_url(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if len(args.clients) != 1 or not 1 <= args.load_processes <= args.clients[0]:
        parser.error("--mode workers takes one --clients count, at least --load-processes (≥ 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["load"]:
        return load_main(argv[1:])
    args = parse_args(argv)
    quiet_logging()
    started = datetime.now(UTC)
    settings = WorkersSettings(
        workers=tuple(args.workers),
        load_processes=args.load_processes,
        clients=args.clients[0],
        duration=args.duration,
        warmup=args.warmup,
        timeout=args.timeout,
        rounds=args.rounds,
    )
    load_before = os.getloadavg()
    with redis_for(args.redis_url) as redis_url:
        assert redis_url is not None
        rows = asyncio.run(run_workers(settings, redis_url))
        env = environment(redis_url, ["redis"])
    load_after = os.getloadavg()
    env["load_average"] = {"before": load_before, "after": load_after}
    summary = summarize_rows(rows)
    shares = "+".join(map(str, settings.shares()))
    text = (
        f"The service on the Redis store with server.workers = "
        f"{', '.join(map(str, settings.workers))} (SO_REUSEPORT; worker counts alternate "
        f"over {settings.rounds} rounds), driven by {settings.load_processes} load processes "
        f"(python -m benchmarks.workers load) with {settings.clients} clients in all "
        f"({shares}); each client has its own channel (TCP connection) and lock and loops "
        "acquire -> keep-alive -> release on the raw stub. "
        f"{settings.duration:g} s measured per run after {settings.warmup:g} s warm-up, "
        f"{settings.timeout:g} s per call; latencies pooled over all calls of all load "
        "processes. CPU from /proc over the window: cores busy = CPU seconds ÷ window "
        f"seconds, machine = every process on the machine's {env['cpus']} cores; CPU per "
        "call = CPU seconds ÷ calls answered. Load average (1, 5, 15 min) before "
        f"{loads(load_before)}, after {loads(load_after)}.\n\n" + workers_tables(rows, summary)
    )
    document = {
        "started": started.isoformat(),
        "command": command_line(MODE, argv),
        "settings": {
            "mode": MODE,
            "workers": list(settings.workers),
            "load_processes": settings.load_processes,
            "clients": settings.clients,
            "clients_per_load_process": settings.shares(),
            "duration": settings.duration,
            "warmup": settings.warmup,
            "timeout": settings.timeout,
            "rounds": settings.rounds,
        },
        "environment": env,
        "workers": {"summary": summary, "runs": rows},
    }
    chart = workers_chart(rows, summary, env["cpus"])
    publish(args.results_dir, MODE, "Workers", started, document, text, chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
