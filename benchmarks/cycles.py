"""The cycles mode, the default: the matrix of targets x scenarios x client counts, each
cell clients looping acquire -> keep-alive -> release (`benchmarks.load`) for a fixed time.

uv run python -m benchmarks.run [--targets echo,memory,redis,redis-direct]
    [--scenarios distinct,contended] [--clients 1,10,50] [--duration 3]
    [--warmup 0.5] [--timeout 2] [--redis-url redis://127.0.0.1:6379/0]
    [--trace-sample-ratio 0.1] [--results-dir benchmarks/results]

More targets: redis-sdk (the redis service through the SDK's client objects);
memory+obs and redis+obs (observability fully on), e.g.
--targets memory,memory+obs,redis,redis+obs for the cost of observability; memory+tls
and redis+tls (TLS and a bearer token on every call), e.g.
--targets memory,memory+tls,redis,redis+tls for the cost of security; scylladb,
dynamodb and dynamodb-moto (the service against one Cassandra node, dynalite, moto);
redis-cluster (the redis store in cluster mode on a local 3-primary Redis Cluster).
Each target is started once and runs all its cells; the run prints one markdown table,
then the target's ratios to the echo server (the ceiling) and of its +obs and +tls
variants to it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from benchmarks.core import (
    add_redis_url,
    command_line,
    counts,
    environment,
    mode_parser,
    names,
    positive,
    publish,
    quiet_logging,
    ratio,
    redis_for,
)
from benchmarks.load import SCENARIOS, LoadSettings, run_cell
from benchmarks.proc import redis_pid
from benchmarks.report import ceiling_rows
from benchmarks.targets import (
    DEFAULT_TARGETS,
    OBSERVED,
    SECURED,
    TARGETS,
    WHERE,
    on_redis,
    open_target,
    target_cpu_probe,
)
from quorum_quest.config.settings import ObservabilitySettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODE = "cycles"
SETTINGS = (
    "targets",
    "scenarios",
    "clients",
    "duration",
    "warmup",
    "timeout",
    "trace_sample_ratio",
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = mode_parser(MODE, __doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "--targets",
        type=names(TARGETS),
        default=list(DEFAULT_TARGETS),
        help=f"from {','.join(TARGETS)}; default {','.join(DEFAULT_TARGETS)}",
    )
    parser.add_argument("--scenarios", type=names(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument(
        "--clients", type=counts, default=[1, 10, 50], help="client counts; default 1,10,50"
    )
    parser.add_argument(
        "--duration", type=positive, default=3.0, help="measured seconds per cell; default 3"
    )
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds run before measuring")
    parser.add_argument("--timeout", type=positive, default=2.0, help="seconds per call")
    add_redis_url(parser)
    parser.add_argument(
        "--trace-sample-ratio",
        type=ratio,
        default=ObservabilitySettings().traceSampleRatio,
        help="traceSampleRatio of the +obs targets; default: the service's default",
    )
    return parser.parse_args(argv)


# -- running ------------------------------------------------------------------------


async def run_all(
    args: argparse.Namespace, redis_url: str | None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every (target, scenario, clients) cell; each target is started once.

    Also returns, per `+obs` target, what its telemetry delivered (`Target.exported`).
    """
    settings = LoadSettings(duration=args.duration, warmup=args.warmup, timeout=args.timeout)
    run_id = uuid.uuid4().hex[:8]
    redis = await redis_pid(redis_url) if redis_url else None
    if redis_url and redis is None:
        print(f"no redis-server of {redis_url} in /proc: no redis CPU", file=sys.stderr)
    results = []
    exported = {}
    for name in args.targets:
        async with open_target(
            name,
            redis_url=redis_url,
            run_id=run_id,
            timeout=args.timeout,
            trace_sample_ratio=args.trace_sample_ratio,
        ) as target:
            probe = target_cpu_probe(target, redis)
            for scenario in args.scenarios:
                for clients in args.clients:
                    result = await run_cell(target, scenario, clients, settings, probe)
                    print(progress_line(result), file=sys.stderr, flush=True)
                    results.append(result)
        if target.exported:
            exported[name] = target.exported
    return results, exported


# -- output -------------------------------------------------------------------------


def decimal(value: float | None) -> str:
    """Two decimals (milliseconds, ratios); - when unknown."""
    return "-" if value is None else f"{value:.2f}"


def rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def latency(result: dict[str, Any], op: str) -> str:
    numbers = result["latency_ms"][op]
    return f"{decimal(numbers['p50'])} / {decimal(numbers['p99'])}"


def cpu(result: dict[str, Any], role: str) -> str:
    """CPU µs per call; n/a where the role has no process of its own, - where not found."""
    per_call = result["cpu_us_per_call"]
    if role not in per_call:
        return "n/a"
    return "-" if per_call[role] is None else f"{per_call[role]:.0f}"


def problems(result: dict[str, Any]) -> int:
    return result["errors"] + sum(result["lost"].values())


def progress_line(result: dict[str, Any]) -> str:
    return (
        f"{result['target']:>12} {result['scenario']:>9} {result['clients']:>3} clients: "
        f"{rate(result['cycles_per_s'])} cycles/s, {problems(result)} errors"
    )


COLUMNS = (
    "target",
    "scenario",
    "clients",
    "cycles/s",
    "attempts/s",
    "calls/s",
    "server CPU µs/call",
    "client CPU µs/call",
    "redis CPU µs/call",
    "acquire p50 / p99 ms",
    "keep-alive p50 / p99 ms",
    "release p50 / p99 ms",
    "errors",
)


def table(results: list[dict[str, Any]]) -> str:
    """The results as one markdown table, then a line per cell that had errors."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in results:
        row = (
            r["target"],
            r["scenario"],
            str(r["clients"]),
            rate(r["cycles_per_s"]),
            rate(r["attempts_per_s"]),
            rate(r["calls_per_s"]),
            cpu(r, "server"),
            cpu(r, "client"),
            cpu(r, "redis"),
            latency(r, "acquire"),
            latency(r, "keep_alive"),
            latency(r, "release"),
            str(problems(r)),
        )
        lines.append("| " + " | ".join(row) + " |")
    troubled = [r for r in results if problems(r)]
    if troubled:
        lines.append(
            "\nErrors (`<op>:<kind>`; `lost:<op>` = refused although the client held the lock):\n"
        )
    for r in troubled:
        kinds = {**r["error_kinds"], **{f"lost:{op}": n for op, n in r["lost"].items()}}
        detail = ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items()))
        lines.append(f"- {r['target']} / {r['scenario']} / {r['clients']} clients: {detail}")
    return "\n".join(lines)


def obs_ratios(
    results: list[dict[str, Any]], pairs: dict[str, str] = OBSERVED
) -> list[dict[str, Any]]:
    """calls/s of `X+obs` over calls/s of `X` (or of each target of `pairs` over its plain
    target), per cell, where both were measured."""
    calls = {(r["target"], r["scenario"], r["clients"]): r["calls_per_s"] for r in results}
    ratios = []
    for (name, scenario, clients), observed in calls.items():
        plain = calls.get((pairs.get(name), scenario, clients))
        if plain:
            cell = {"target": name, "scenario": scenario, "clients": clients}
            ratios.append({**cell, "ratio": observed / plain})
    return ratios


def obs_summary(
    ratios: list[dict[str, Any]], exported: dict[str, dict[str, Any]], sample_ratio: float
) -> str:
    """The ratios as a small table, then what each `+obs` target's telemetry delivered."""
    lines = []
    if ratios:
        pairs = list(dict.fromkeys(r["target"] for r in ratios))
        cells = list(dict.fromkeys((r["scenario"], r["clients"]) for r in ratios))
        found = {(r["target"], r["scenario"], r["clients"]): r["ratio"] for r in ratios}
        header = ["scenario", "clients", *(f"{name} / {OBSERVED[name]}" for name in pairs)]
        lines += [
            f"\nCost of observability (calls/s with it on / without; trace sample ratio "
            f"{sample_ratio:g}):\n",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        for scenario, clients in cells:
            values = [found.get((name, scenario, clients)) for name in pairs]
            shown = [decimal(value) for value in values]
            lines.append("| " + " | ".join([scenario, str(clients), *shown]) + " |")
    if exported:
        lines.append("\nReceived by the OTLP sink (whole target, warm-ups included):\n")
    for name, received in exported.items():
        scraped = received.get("prometheus_samples")
        lines.append(
            f"- {name}: {received.get('spans', 0)} spans in {received.get('trace_exports', 0)} "
            f"exports, {received.get('metric_points', 0)} metric points in "
            f"{received.get('metric_exports', 0)} exports; Prometheus scrape: "
            + ("failed" if scraped is None else f"{scraped} quorum_quest samples")
        )
    return "\n".join(lines)


def tls_summary(ratios: list[dict[str, Any]]) -> str:
    """calls/s of each `+tls` target over its plain target, as a small table."""
    pairs = list(dict.fromkeys(r["target"] for r in ratios))
    cells = list(dict.fromkeys((r["scenario"], r["clients"]) for r in ratios))
    found = {(r["target"], r["scenario"], r["clients"]): r["ratio"] for r in ratios}
    header = ["scenario", "clients", *(f"{name} / {SECURED[name]}" for name in pairs)]
    lines = [
        "\nCost of TLS + bearer tokens (calls/s secured / plaintext without auth):\n",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for scenario, clients in cells:
        shown = [decimal(found.get((name, scenario, clients))) for name in pairs]
        lines.append("| " + " | ".join([scenario, str(clients), *shown]) + " |")
    return "\n".join(lines)


def ceiling_summary(rows: list[dict[str, Any]]) -> str:
    """Each target against the echo server: its share of the ceiling and the cycle bound."""
    lines = [
        "\nAgainst the ceiling (the echo server on the same clients; bound = echo calls/s ÷ 3, "
        "the cycles/s a do-nothing server allows):\n",
        "| scenario | clients | target | calls/s ÷ echo | cycles/s | bound cycles/s | "
        "cycles ÷ bound | server CPU ÷ echo | total CPU ÷ echo |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda row: (row["scenario"], row["clients"])):
        lines.append(
            f"| {row['scenario']} | {row['clients']} | {row['target']} | "
            f"{row['calls_ratio']:.2f} | {rate(row['cycles_per_s'])} | "
            f"{rate(row['bound_cycles_per_s'])} | {row['cycles_of_bound']:.2f} | "
            f"{decimal(row['server_cpu_ratio'])} | {decimal(row['total_cpu_ratio'])} |"
        )
    return "\n".join(lines)


def cycles_chart(results: Sequence[dict[str, Any]]) -> Callable[[Figure], None]:
    """Grouped bars per (scenario, clients): calls/s and cycles/s of each target."""

    def draw(figure: Figure) -> None:
        cells = list(dict.fromkeys((r["scenario"], r["clients"]) for r in results))
        targets = list(dict.fromkeys(r["target"] for r in results))
        found = {(r["target"], r["scenario"], r["clients"]): r for r in results}
        width = 0.8 / len(targets)
        axes = figure.subplots(1, 2)
        for ax, column, title in (
            (axes[0], "calls_per_s", "calls/s"),
            (axes[1], "cycles_per_s", "cycles/s (echo = the bound, echo calls/s ÷ 3)"),
        ):
            for i, target in enumerate(targets):
                xs = [c + (i - (len(targets) - 1) / 2) * width for c in range(len(cells))]
                values = [found.get((target, *cell), {}).get(column, 0.0) for cell in cells]
                ax.bar(xs, values, width, label=target)
            ax.set_xticks(range(len(cells)), [f"{s}\n{n} clients" for s, n in cells])
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize="small")

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    quiet_logging()
    started = datetime.now(UTC)
    with redis_for(args.redis_url, any(map(on_redis, args.targets))) as redis_url:
        results, exported = asyncio.run(run_all(args, redis_url))
        env = environment(redis_url, args.targets)
    where = {name: WHERE[name] for name in args.targets}
    ratios = obs_ratios(results)
    tls_ratios = obs_ratios(results, SECURED)
    ceiling = ceiling_rows(results)
    parts = [
        f"{args.duration:g} s per cell after {args.warmup:g} s warm-up, "
        f"{args.timeout:g} s per call; {env['cpus']} CPUs shared by the load-generating "
        "process, the service process and the store's server (redis-server, the Cassandra "
        "JVM, the emulator). CPU µs/call: user + system CPU seconds used in the window ÷ "
        "calls answered in it, of the target's server process tree (/proc), of this "
        "process (the clients; `time.process_time`) and of redis-server (/proc); "
        "/proc counts 10 ms ticks.\n",
        "\n".join(f"- {name}: {text}" for name, text in where.items()) + "\n",
        table(results),
    ]
    if ceiling:
        parts.append(ceiling_summary(ceiling))
    if ratios or exported:
        parts.append(obs_summary(ratios, exported, args.trace_sample_ratio))
    if tls_ratios:
        parts.append(tls_summary(tls_ratios))
    document = {
        "started": started.isoformat(),
        "command": command_line(MODE, argv),
        "settings": {"mode": MODE, **{key: getattr(args, key) for key in SETTINGS}},
        "environment": env,
        "targets": where,
        "ceiling": ceiling,
        "observability": {"ratios": ratios, "exported": exported},
        "security": {"ratios": tls_ratios},
        "results": results,
    }
    text = "\n".join(parts)
    publish(args.results_dir, MODE, "Benchmark", started, document, text, cycles_chart(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
