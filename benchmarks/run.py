"""Run the benchmark matrix, print one markdown table, save it as JSON, Markdown and PNG.

uv run python -m benchmarks.run [--targets echo,memory,redis,redis-direct]
    [--scenarios distinct,contended] [--clients 1,10,50] [--duration 3]
    [--warmup 0.5] [--timeout 2] [--redis-url redis://127.0.0.1:6379/0]
    [--trace-sample-ratio 0.1] [--results-dir benchmarks/results]
uv run python -m benchmarks.run --mode failover [--ttl 3] [--rounds 5] [--waiters 3]
uv run python -m benchmarks.run --mode workers [--workers 1,2] [--load-processes 2]
    [--clients 50] [--duration 5] [--rounds 3]
uv run python -m benchmarks.run --mode many-leases [--leases 1000,10000,50000] [--ttl 15]
    [--duration 30] [--find-max]   (the options of `python -m benchmarks.many_leases`)
uv run python -m benchmarks.run --mode watch [--streams 10000] [--watch-on locks,service]
    [--rounds 3]   (the options of `python -m benchmarks.watch`)

More targets: redis-sdk (the redis service through the SDK's client objects);
memory+obs and redis+obs (observability fully on), e.g.
--targets memory,memory+obs,redis,redis+obs for the cost of observability; memory+tls
and redis+tls (TLS and a bearer token on every call), e.g.
--targets memory,memory+tls,redis,redis+tls for the cost of security; scylladb,
dynamodb and dynamodb-moto (the service against one Cassandra node, dynalite, moto);
redis-cluster (the redis store in cluster mode on a local 3-primary Redis Cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import platform
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from benchmarks import many_leases, watch
from benchmarks.failover import (
    FailoverSettings,
    expected_ms,
    failover_table,
    run_failover,
    summarize,
)
from benchmarks.load import SCENARIOS, LoadSettings, cpu_probe, run_cell
from benchmarks.proc import redis_pid
from benchmarks.report import ceiling_rows, cycles_chart, failover_chart, save, workers_chart
from benchmarks.targets import (
    DEFAULT_TARGETS,
    OBSERVED,
    SECURED,
    TARGETS,
    WHERE,
    ClusterTarget,
    on_redis,
    open_target,
)
from benchmarks.workers import WorkersSettings, run_workers, summarize_rows, workers_tables
from quorum_quest.config.settings import LoggerSettings, ObservabilitySettings
from quorum_quest.telemetry.logging import configure_logging
from tests.backends.cassandra import CASSANDRA_VERSION
from tests.backends.dynamodb import DYNALITE_VERSION
from tests.backends.redis import RedisProcess

RESULTS_DIR = Path(__file__).parent / "results"
# A mode with options of its own, run by its module.
MANY_LEASES = "many-leases"
MANY_LEASES_COMMAND = "python -m benchmarks.many_leases"
WATCH = "watch"  # the same, run by benchmarks.watch
SETTINGS = (
    "mode",
    "targets",
    "scenarios",
    "clients",
    "duration",
    "warmup",
    "timeout",
    "trace_sample_ratio",
)
# Defaults that differ between the modes: --clients, --duration, --rounds.
DEFAULTS = {
    "cycles": {"clients": [1, 10, 50], "duration": 3.0, "rounds": 5},
    "failover": {"clients": [1, 10, 50], "duration": 3.0, "rounds": 5},
    "workers": {"clients": [50], "duration": 5.0, "rounds": 3},
}


# -- command line -------------------------------------------------------------------


def names(known: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of `known`, in the given order."""

    def parse(text: str) -> list[str]:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {','.join(known)}")
        return chosen

    return parse


def counts(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers such as 1,10,50")
    return values


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def loopback_url(text: str) -> str:
    """A redis:// URL on the loopback interface: the benchmark never leaves this machine."""
    parts = urlsplit(text)
    if parts.scheme != "redis" or not parts.hostname:
        raise argparse.ArgumentTypeError("expected redis://127.0.0.1:<port>/<db>")
    host = parts.hostname
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise argparse.ArgumentTypeError("only a Redis on 127.0.0.1 is allowed")
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--mode",
        choices=(*DEFAULTS, MANY_LEASES, WATCH),
        default="cycles",
        help="cycles: the matrix of targets (default); failover: how long a lock stays "
        "unheld after its leader dies or exits; workers: the redis service with 1, 2, ... "
        "worker processes under several load processes; many-leases: one client renewing "
        f"N leases in batches (takes the options of {MANY_LEASES_COMMAND}); watch: "
        "WatchLeaders change latency across instances and 10,000 idle streams (takes the "
        "options of python -m benchmarks.watch)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where the JSON, Markdown and PNG files go; default benchmarks/results",
    )
    parser.add_argument(
        "--targets",
        type=names(TARGETS),
        default=list(DEFAULT_TARGETS),
        help=f"from {','.join(TARGETS)}; default {','.join(DEFAULT_TARGETS)}",
    )
    parser.add_argument("--scenarios", type=names(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument(
        "--clients",
        type=counts,
        default=None,
        help="client counts; default 1,10,50 (workers: one count, in all, default 50)",
    )
    parser.add_argument(
        "--duration",
        type=positive,
        default=None,
        help="measured seconds per cell; default 3 (workers: per run, default 5)",
    )
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds run before measuring")
    parser.add_argument("--timeout", type=positive, default=2.0, help="seconds per call")
    parser.add_argument(
        "--redis-url",
        type=loopback_url,
        default=None,
        help="a Redis on 127.0.0.1 to use; default: start a throw-away redis-server",
    )
    parser.add_argument(
        "--trace-sample-ratio",
        type=ratio,
        default=ObservabilitySettings().traceSampleRatio,
        help="traceSampleRatio of the +obs targets; default: the service's default",
    )
    failover = parser.add_argument_group("--mode failover")
    failover.add_argument("--ttl", type=positive, default=3.0, help="lease of leader and waiters")
    failover.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds per case; default 5 (workers: rounds of all worker counts, default 3)",
    )
    failover.add_argument("--waiters", type=int, default=3, help="waiting clients per round")
    failover.add_argument(
        "--settle", type=float, default=None, help="seconds the waiters poll first; default ttl"
    )
    workers = parser.add_argument_group("--mode workers")
    workers.add_argument(
        "--workers", type=counts, default=[1, 2], help="server.workers counts; default 1,2"
    )
    workers.add_argument(
        "--load-processes", type=int, default=2, help="load-generating processes; default 2"
    )
    args = parser.parse_args(argv)
    for key, default in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.rounds < 1 or args.waiters < 1:
        parser.error("--rounds and --waiters must be at least 1")
    if args.mode == "workers" and (
        len(args.clients) != 1 or not 1 <= args.load_processes <= args.clients[0]
    ):
        parser.error("--mode workers takes one --clients count, at least --load-processes (≥ 1)")
    return args


# -- running ------------------------------------------------------------------------


@contextmanager
def redis_for(args: argparse.Namespace, needed: bool) -> Iterator[str | None]:
    """The Redis URL to use: --redis-url, a started redis-server, or None if not `needed`."""
    if not needed:
        yield None
    elif args.redis_url:
        yield args.redis_url
    else:
        with RedisProcess() as server:
            yield server.url


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
            if isinstance(target, ClusterTarget):  # redis: its primaries; replicas apart
                probe = cpu_probe(target, target.primary_pids, True, target.replica_pids)
            else:
                probe = cpu_probe(target, redis, on_redis(name))
            for scenario in args.scenarios:
                for clients in args.clients:
                    result = await run_cell(target, scenario, clients, settings, probe)
                    print(progress_line(result), file=sys.stderr, flush=True)
                    results.append(result)
        if target.exported:
            exported[name] = target.exported
    return results, exported


def environment(redis_url: str | None, targets: Sequence[str]) -> dict[str, Any]:
    """What the numbers depend on besides the code."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "grpcio": version("grpcio"),
        "redis-py": version("redis"),
    }
    if "scylladb" in targets:
        hosts = os.environ.get("QQ_TEST_CQL_HOSTS")
        info["cql-server"] = (
            f"QQ_TEST_CQL_HOSTS={hosts}" if hosts else f"Apache Cassandra {CASSANDRA_VERSION}"
        )
    if "dynamodb" in targets:
        info["dynalite"] = DYNALITE_VERSION
    if "dynamodb-moto" in targets:
        info["moto"] = version("moto")  # the target needs it: it ran, so it is installed
    if redis_url:
        client = redis.Redis.from_url(redis_url)
        try:
            info["redis-server"] = client.info("server")["redis_version"]
        finally:
            client.close()
    return info


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
    for name, counts in exported.items():
        scraped = counts.get("prometheus_samples")
        lines.append(
            f"- {name}: {counts.get('spans', 0)} spans in {counts.get('trace_exports', 0)} "
            f"exports, {counts.get('metric_points', 0)} metric points in "
            f"{counts.get('metric_exports', 0)} exports; Prometheus scrape: "
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


def stem(started: datetime, mode: str) -> str:
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    return stamp if mode == "cycles" else f"{stamp}-{mode}"


def command_line(argv: Sequence[str] | None) -> str:
    given = sys.argv[1:] if argv is None else argv
    return " ".join(["uv run python -m benchmarks.run", *given])


def run_cycles(args: argparse.Namespace, started: datetime, command: str) -> list[Path]:
    with redis_for(args, any(map(on_redis, args.targets))) as redis_url:
        results, exported = asyncio.run(run_all(args, redis_url))
        env = environment(redis_url, args.targets)
    settings = {key: getattr(args, key) for key in SETTINGS}
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
    text = "\n".join(parts)
    print("\n" + text)
    document = {
        "started": started.isoformat(),
        "command": command,
        "settings": settings,
        "environment": env,
        "targets": where,
        "ceiling": ceiling,
        "observability": {"ratios": ratios, "exported": exported},
        "security": {"ratios": tls_ratios},
        "results": results,
    }
    markdown = f"# Benchmark {started:%Y-%m-%d %H:%M:%S} UTC\n\n`{command}`\n\n{text}"
    return save(
        args.results_dir, stem(started, "cycles"), document, markdown, cycles_chart(results)
    )


def run_failover_mode(args: argparse.Namespace, started: datetime, command: str) -> list[Path]:
    settings = FailoverSettings(
        ttl=args.ttl,
        rounds=args.rounds,
        waiters=args.waiters,
        settle=args.ttl if args.settle is None else args.settle,
    )
    with redis_for(args, True) as redis_url:
        assert redis_url is not None
        rounds = asyncio.run(run_failover(settings, redis_url))
        env = environment(redis_url, ["redis"])
    interval = settings.keep_alive_interval
    text = (
        f"Failover on the redis service: a leader process in the SDK's leadership() with "
        f"ttl {settings.ttl:g} s (renewal every {interval:g} s), {settings.waiters} waiting "
        f"SDK clients that poll for {settings.settle:g} s (plus up to one renewal interval) "
        "before the leader goes away; "
        f"{env['cpus']} CPUs shared by all processes.\n\n" + failover_table(rounds, settings)
    )
    print("\n" + text)
    document = {
        "started": started.isoformat(),
        "command": command,
        "settings": {
            "mode": args.mode,
            "ttl": settings.ttl,
            "keep_alive_interval": interval,
            "rounds": settings.rounds,
            "waiters": settings.waiters,
            "settle": settings.settle,
        },
        "environment": env,
        "failover": {"summary": summarize(rounds), "rounds": rounds},
    }
    markdown = f"# Failover {started:%Y-%m-%d %H:%M:%S} UTC\n\n`{command}`\n\n{text}"
    chart = failover_chart(rounds, expected_ms(settings))
    return save(args.results_dir, stem(started, "failover"), document, markdown, chart)


def run_workers_mode(args: argparse.Namespace, started: datetime, command: str) -> list[Path]:
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
    with redis_for(args, True) as redis_url:
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
        f"(python -m benchmarks.workers) with {settings.clients} clients in all ({shares}); "
        "each client has its own channel (TCP connection) and lock and loops acquire -> "
        "keep-alive -> release on the raw stub. "
        f"{settings.duration:g} s measured per run after {settings.warmup:g} s warm-up, "
        f"{settings.timeout:g} s per call; latencies pooled over all calls of all load "
        "processes. CPU from /proc over the window: cores busy = CPU seconds ÷ window "
        f"seconds, machine = every process on the machine's {env['cpus']} cores; CPU per "
        "call = CPU seconds ÷ calls answered. Load average (1, 5, 15 min) before "
        f"{loads(load_before)}, after {loads(load_after)}.\n\n" + workers_tables(rows, summary)
    )
    print("\n" + text)
    document = {
        "started": started.isoformat(),
        "command": command,
        "settings": {
            "mode": args.mode,
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
    markdown = f"# Workers {started:%Y-%m-%d %H:%M:%S} UTC\n\n`{command}`\n\n{text}"
    chart = workers_chart(rows, summary, env["cpus"])
    return save(args.results_dir, stem(started, "workers"), document, markdown, chart)


def loads(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


MODES = {"cycles": run_cycles, "failover": run_failover_mode, "workers": run_workers_mode}


def mode_and_rest(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The --mode given, and the other arguments."""
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode")
    known, rest = mode.parse_known_args(argv)
    return known.mode, rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    mode, rest = mode_and_rest(argv)
    if mode == MANY_LEASES:
        return many_leases.main(rest)
    if mode == WATCH:
        return watch.main(rest)
    args = parse_args(argv)
    configure_logging(LoggerSettings(level="WARNING"))
    started = datetime.now(UTC)
    command = command_line(argv)
    run = MODES[args.mode]
    paths = run(args, started, command)
    print(f"\nresults written to {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
