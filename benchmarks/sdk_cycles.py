"""The sdk-cycles mode: what the SDK's Session stream saves against unary calls, measured
with the SDK as an application uses it.

uv run python -m benchmarks.run --mode sdk-cycles [--targets redis,memory] [--clients 50]
    [--ttl 10] [--duration 5] [--warmup 1] [--rounds 3] [--timeout 2]
    [--redis-url redis://127.0.0.1:6379/0] [--results-dir DIR]

(the same as `python -m benchmarks.sdk_cycles` with those options). `--clients` asyncio
tasks in this process each own a `QuorumQuestClient(service, f"lock-{i}", ttl, address,
session=...)` on a lock of its own, and loop `await client.try_acquire_lock()` then
`await client.release_lock()` with no pause. `session=True` (the SDK's default): the
clients' operations go over the one `Session` stream the clients of an address share;
`session=False`: one unary call per operation.

Each target is started once, as the other modes start it (`benchmarks.targets`). Each
round runs both transports on it, in turn, session first in odd rounds and unary first
in even ones (a drift of the machine's load hits both alike): new clients, `--warmup`
seconds, then the `--duration`-second window, after which each client finishes its
operation and stops, and all are closed. Counted in the window: operations answered (an
acquire or a release: 2 per cycle) and their latencies (`benchmarks.load.Tally`);
errors are operations that raised (`<op>:<kind>`, over the whole run) and lost ones: an
acquire refused or a release that released nothing, never expected as every lock is its
client's own. CPU seconds over the window, as the other modes read them: the target's
server process tree and redis-server (`/proc`), and this process, i.e. the clients
(`time.process_time`). A session client that met a service without `Session` falls
back to unary calls; the run counts such clients (`fell_back`), so a session column is
never unary calls in disguise.

The table puts session and unary side by side per target: medians (min–max) over the
rounds, and session ÷ unary as the median (min–max) of each round's ratio (a round's
two runs are back to back, so the ratio is steadier than the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from benchmarks.core import (
    add_redis_url,
    command_line,
    environment,
    mode_parser,
    names,
    positive,
    publish,
    quiet_logging,
    redis_for,
)
from benchmarks.load import ERROR_BACKOFF_S, Tally, Window, cpu_in_window, percentile
from benchmarks.proc import CpuProbe, cpu_per_call, redis_pid
from benchmarks.report import median_range, shown
from benchmarks.targets import (
    EMULATED,
    OBSERVED,
    WHERE,
    ServiceTarget,
    on_redis,
    open_target,
    target_cpu_probe,
)
from quorum_quest import QuorumQuestClient

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODE = "sdk-cycles"
TRANSPORTS = ("session", "unary")
OPERATIONS = ("acquire", "release")
# Services the SDK reaches in plaintext without a token (the SDK would need the +tls
# targets' certificate and token; echo has no Session method).
SDK_TARGETS = ("memory", "redis", "redis-cluster", *OBSERVED, *EMULATED)
ROLES = ("server", "client", "redis")
SERVICE = "qq-bench-sdk"


@dataclass(frozen=True, slots=True)
class SdkSettings:
    clients: int
    ttl: float  # the clients' lease, seconds
    duration: float  # seconds measured per run
    warmup: float  # seconds run before measuring
    timeout: float  # seconds per operation (the clients' rpc_timeout)
    rounds: int


# -- one run ----------------------------------------------------------------------------


async def cycle(client: QuorumQuestClient, tally: Tally) -> None:
    """acquire -> release until the window ends, as an application writes it."""
    while time.perf_counter() < tally.window.end:
        granted = await tally.call("acquire", client.try_acquire_lock())
        if granted is False:
            tally.lost["acquire"] += 1  # the lock is this client's own: never refused
        released = await tally.call("release", client.release_lock()) if granted else None
        if released is False:
            tally.lost["release"] += 1
        if not released:
            await asyncio.sleep(ERROR_BACKOFF_S)


async def run_transport(
    target: ServiceTarget, transport: str, probe: CpuProbe, settings: SdkSettings
) -> dict[str, Any]:
    """New clients on `transport` through the warm-up and the window; what they did."""
    service = f"{SERVICE}-{uuid.uuid4().hex[:8]}"
    clients = [
        QuorumQuestClient(
            service,
            f"lock-{i}",
            settings.ttl,
            target.address,
            rpc_timeout=settings.timeout,
            session=transport == "session",
        )
        for i in range(settings.clients)
    ]
    start = time.perf_counter() + settings.warmup
    tally = Tally(Window(start, start + settings.duration))
    guard = settings.warmup + settings.duration + 3 * settings.timeout + 5
    try:
        async with asyncio.TaskGroup() as group:
            reading = group.create_task(cpu_in_window(tally.window, probe))
            try:
                async with asyncio.timeout(guard):
                    await asyncio.gather(*(cycle(client, tally) for client in clients))
            except TimeoutError:
                tally.errors["harness:guard-timeout"] += 1
        tally.cpu_s = reading.result()
        # With session=False `_use_session` is False from the start: nothing fell back.
        fell_back = sum(not client._use_session for client in clients if transport == "session")
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    return summarize_run(target.name, transport, tally, fell_back)


def summarize_run(target: str, transport: str, tally: Tally, fell_back: int) -> dict[str, Any]:
    seconds = tally.window.duration
    operations = sum(len(tally.latencies_ms[op]) for op in OPERATIONS)
    return {
        "target": target,
        "transport": transport,
        "duration_s": seconds,
        "operations": operations,
        "ops_per_s": operations / seconds,
        "latency_ms": {
            op: {
                "count": len(tally.latencies_ms[op]),
                "p50": percentile(tally.latencies_ms[op], 50),
                "p99": percentile(tally.latencies_ms[op], 99),
            }
            for op in OPERATIONS
        },
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "lost": dict(tally.lost),
        "fell_back": fell_back,
        "cpu_s": tally.cpu_s,
        "cpu_us_per_op": cpu_per_call(tally.cpu_s, operations),
    }


def progress_line(row: dict[str, Any]) -> str:
    server = row["cpu_us_per_op"].get("server")
    return (
        f"sdk-cycles round {row['round']}: {row['target']:>8} {row['transport']:>7}: "
        f"{row['ops_per_s']:.0f} ops/s, server {number(server)} µs/op, "
        f"{row['errors'] + sum(row['lost'].values())} errors"
    )


async def run_rounds(
    targets: Sequence[str], settings: SdkSettings, redis_url: str | None
) -> list[dict[str, Any]]:
    """Every round of both transports on each target, each target started once."""
    run_id = uuid.uuid4().hex[:8]
    redis = await redis_pid(redis_url) if redis_url else None
    if redis_url and redis is None:
        print(f"no redis-server of {redis_url} in /proc: no redis CPU", file=sys.stderr)
    rows = []
    for name in targets:
        async with open_target(
            name,
            redis_url=redis_url,
            run_id=run_id,
            timeout=settings.timeout,
            trace_sample_ratio=0.0,
        ) as target:
            assert isinstance(target, ServiceTarget)  # SDK_TARGETS are services over gRPC
            probe = target_cpu_probe(target, redis)
            for round_ in range(1, settings.rounds + 1):
                order = TRANSPORTS if round_ % 2 else TRANSPORTS[::-1]
                for transport in order:
                    run = await run_transport(target, transport, probe, settings)
                    row = {"round": round_, **run}
                    print(progress_line(row), file=sys.stderr, flush=True)
                    rows.append(row)
    return rows


# -- the summary and the table -------------------------------------------------------------

# The rows of the table: (label, the value of a run, digits shown)
METRICS: tuple[tuple[str, Callable[[dict[str, Any]], float | None], int], ...] = (
    ("operations/s", lambda row: row["ops_per_s"], 0),
    ("server CPU µs/op", lambda row: row["cpu_us_per_op"].get("server"), 0),
    ("client CPU µs/op", lambda row: row["cpu_us_per_op"].get("client"), 0),
    ("redis CPU µs/op", lambda row: row["cpu_us_per_op"].get("redis"), 0),
    ("acquire p50 ms", lambda row: row["latency_ms"]["acquire"]["p50"], 2),
    ("acquire p99 ms", lambda row: row["latency_ms"]["acquire"]["p99"], 2),
    ("release p50 ms", lambda row: row["latency_ms"]["release"]["p50"], 2),
)


def ratio(session: float | None, unary: float | None) -> float | None:
    return session / unary if session is not None and unary else None


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target and metric: each transport's median (min–max) over the rounds, and the
    median (min–max) of the rounds' session ÷ unary."""
    summary = []
    for target in dict.fromkeys(row["target"] for row in rows):
        runs = {(row["round"], row["transport"]): row for row in rows if row["target"] == target}
        rounds = sorted({round_ for round_, _ in runs})
        for label, value, digits in METRICS:
            by_transport = {
                transport: [value(runs[r, transport]) for r in rounds] for transport in TRANSPORTS
            }
            if all(v is None for values in by_transport.values() for v in values):
                continue  # e.g. redis CPU on the memory target
            summary.append(
                {
                    "target": target,
                    "metric": label,
                    "digits": digits,
                    **{t: median_range(values) for t, values in by_transport.items()},
                    "session_over_unary": median_range(
                        [ratio(s, u) for s, u in zip(*by_transport.values(), strict=True)]
                    ),
                }
            )
    return summary


def number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str:
    """The metrics per target, session and unary side by side; then every run."""
    lines = [
        "| target | metric | session | unary | session ÷ unary |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['target']} | {s['metric']} | {shown(s['session'], s['digits'])} | "
            f"{shown(s['unary'], s['digits'])} | {shown(s['session_over_unary'], 2)} |"
        )
    lines += [
        "\nRuns, in the order they ran:\n",
        "| round | target | transport | operations | ops/s | server / client / redis CPU "
        "µs/op | acquire p50 / p99 ms | errors | lost | fell back to unary |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cpu = row["cpu_us_per_op"]
        per_op = " / ".join("n/a" if role not in cpu else number(cpu[role]) for role in ROLES)
        acquire = row["latency_ms"]["acquire"]
        lines.append(
            f"| {row['round']} | {row['target']} | {row['transport']} | {row['operations']} | "
            f"{row['ops_per_s']:.0f} | {per_op} | {number(acquire['p50'], 2)} / "
            f"{number(acquire['p99'], 2)} | {row['errors']} | {sum(row['lost'].values())} | "
            f"{row['fell_back']} |"
        )
    troubled = [row for row in rows if row["errors"] or row["lost"]]
    if troubled:
        lines.append("\nErrors (`<op>:<kind>`; `lost:<op>` = refused although the lock is free):\n")
    for row in troubled:
        kinds = {**row["error_kinds"], **{f"lost:{op}": n for op, n in row["lost"].items()}}
        detail = ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items()))
        lines.append(f"- round {row['round']}, {row['target']} / {row['transport']}: {detail}")
    return "\n".join(lines)


def chart(rows: Sequence[dict[str, Any]]) -> Callable[[Figure], None]:
    """Per target, each transport's operations/s and server CPU µs/op: rounds and median."""

    def draw(figure: Figure) -> None:
        targets = list(dict.fromkeys(row["target"] for row in rows))
        for ax, (label, value, _) in zip(figure.subplots(1, 2), METRICS[:2], strict=True):
            for offset, transport in ((-0.2, "session"), (0.2, "unary")):
                color = "C0" if transport == "session" else "C1"
                for place, target in enumerate(targets):
                    values = [
                        v
                        for row in rows
                        if (row["target"], row["transport"]) == (target, transport)
                        and (v := value(row)) is not None
                    ]
                    if not values:
                        continue
                    first = place == 0  # one legend entry per transport
                    ax.bar(
                        place + offset,
                        statistics.median(values),
                        0.35,
                        color=color,
                        alpha=0.4,
                        label=transport if first else None,
                    )
                    ax.plot([place + offset] * len(values), values, "o", color=color)
            ax.set_xticks(range(len(targets)), targets)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{label}: rounds (dots), median (bar)")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize="small")

    return draw


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = mode_parser(MODE, __doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "--targets",
        type=names(SDK_TARGETS),
        default=["redis"],
        help=f"from {','.join(SDK_TARGETS)}; default redis",
    )
    parser.add_argument(
        "--clients", type=int, default=50, help="SDK clients, one lock each; default 50"
    )
    parser.add_argument("--ttl", type=positive, default=10.0, help="the clients' lease; default 10")
    parser.add_argument(
        "--duration", type=positive, default=5.0, help="measured seconds per run; default 5"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds run before measuring; default 1"
    )
    parser.add_argument("--timeout", type=positive, default=2.0, help="seconds per operation")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of both transports; default 3"
    )
    add_redis_url(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.clients < 1 or args.warmup < 0:
        parser.error("--rounds and --clients must be at least 1, --warmup not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    quiet_logging()
    started = datetime.now(UTC)
    settings = SdkSettings(
        clients=args.clients,
        ttl=args.ttl,
        duration=args.duration,
        warmup=args.warmup,
        timeout=args.timeout,
        rounds=args.rounds,
    )
    with redis_for(args.redis_url, any(map(on_redis, args.targets))) as redis_url:
        rows = asyncio.run(run_rounds(args.targets, settings, redis_url))
        env = environment(redis_url, args.targets)
    summary = summarize(rows)
    where = {name: WHERE[name] for name in args.targets}
    text = (
        f"{settings.clients} SDK clients (QuorumQuestClient, one lock each, ttl "
        f"{settings.ttl:g} s, rpc_timeout {settings.timeout:g} s) in this process, each "
        "looping try_acquire_lock() -> release_lock(); session: over the shared Session "
        "stream (session=True), unary: a unary call per operation (session=False). "
        f"{settings.duration:g} s measured per run after {settings.warmup:g} s warm-up, "
        f"{settings.rounds} rounds, the transports' order alternating. An operation is an "
        "acquire or a release answered in the window; CPU µs/op: user + system CPU seconds "
        "in the window ÷ operations, of the service's process tree and redis-server "
        "(/proc) and of this process, the clients (time.process_time); "
        f"{env['cpus']} CPUs shared by all of them. Median (min–max) over the rounds; "
        "session ÷ unary: of each round's pair of runs.\n\n"
        + "\n".join(f"- {name}: {text}" for name, text in where.items())
        + "\n\n"
        + table(summary, rows)
    )
    document = {
        "started": started.isoformat(),
        "command": command_line(MODE, argv),
        "settings": {
            "mode": MODE,
            "targets": args.targets,
            **{key: getattr(settings, key) for key in SdkSettings.__dataclass_fields__},
        },
        "environment": env,
        "targets": where,
        "sdk_cycles": {"summary": summary, "runs": rows},
    }
    publish(args.results_dir, MODE, "SDK cycles", started, document, text, chart(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
