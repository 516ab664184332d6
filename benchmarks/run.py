"""Run the benchmark matrix, print one markdown table, save the results as JSON.

uv run python -m benchmarks.run [--targets memory,redis,redis-direct]
    [--scenarios distinct,contended] [--clients 1,10,50] [--duration 3]
    [--warmup 0.5] [--timeout 2] [--redis-url redis://127.0.0.1:6379/0]
    [--trace-sample-ratio 0.1]

More targets: memory+obs and redis+obs (observability fully on), e.g.
--targets memory,memory+obs,redis,redis+obs for the cost of observability; scylladb,
dynamodb and dynamodb-moto (the service against one Cassandra node, dynalite, moto).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
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

from benchmarks.load import SCENARIOS, LoadSettings, run_cell
from benchmarks.targets import DEFAULT_TARGETS, OBSERVED, TARGETS, WHERE, open_target
from quorum_quest.config.settings import LoggerSettings, ObservabilitySettings
from quorum_quest.telemetry.logging import configure_logging
from tests.backends.cassandra import CASSANDRA_VERSION
from tests.backends.dynamodb import DYNALITE_VERSION
from tests.backends.redis import RedisProcess

RESULTS_DIR = Path(__file__).parent / "results"
SETTINGS = (
    "targets",
    "scenarios",
    "clients",
    "duration",
    "warmup",
    "timeout",
    "trace_sample_ratio",
)


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
        "--targets",
        type=names(TARGETS),
        default=list(DEFAULT_TARGETS),
        help=f"from {','.join(TARGETS)}; default {','.join(DEFAULT_TARGETS)}",
    )
    parser.add_argument("--scenarios", type=names(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--clients", type=counts, default=[1, 10, 50])
    parser.add_argument("--duration", type=positive, default=3.0, help="measured seconds per cell")
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
    return parser.parse_args(argv)


# -- running ------------------------------------------------------------------------


@contextmanager
def redis_for(args: argparse.Namespace) -> Iterator[str | None]:
    """The Redis URL to use: --redis-url, a started redis-server, or None if no target needs one."""
    if not any(target.startswith("redis") for target in args.targets):
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
            for scenario in args.scenarios:
                for clients in args.clients:
                    result = await run_cell(target, scenario, clients, settings)
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


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def latency(result: dict[str, Any], op: str) -> str:
    numbers = result["latency_ms"][op]
    return f"{ms(numbers['p50'])} / {ms(numbers['p99'])}"


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


def obs_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """calls/s of `X+obs` over calls/s of `X`, per cell, where both were measured."""
    calls = {(r["target"], r["scenario"], r["clients"]): r["calls_per_s"] for r in results}
    ratios = []
    for (name, scenario, clients), observed in calls.items():
        plain = calls.get((OBSERVED.get(name), scenario, clients))
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
            shown = ["-" if value is None else f"{value:.2f}" for value in values]
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


def write_json(document: dict[str, Any], started: datetime) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(LoggerSettings(level="WARNING"))
    started = datetime.now(UTC)
    with redis_for(args) as redis_url:
        results, exported = asyncio.run(run_all(args, redis_url))
        env = environment(redis_url, args.targets)
    settings = {key: getattr(args, key) for key in SETTINGS}
    where = {name: WHERE[name] for name in args.targets}
    print(
        f"\n{args.duration:g} s per cell after {args.warmup:g} s warm-up, "
        f"{args.timeout:g} s per call; {env['cpus']} CPUs shared by the load-generating "
        "process, the service process and the store's server (redis-server, the Cassandra "
        "JVM, the emulator).\n"
    )
    print("\n".join(f"- {name}: {text}" for name, text in where.items()) + "\n")
    print(table(results))
    ratios = obs_ratios(results)
    if ratios or exported:
        print(obs_summary(ratios, exported, args.trace_sample_ratio))
    document = {
        "started": started.isoformat(),
        "settings": settings,
        "environment": env,
        "targets": where,
        "observability": {"ratios": ratios, "exported": exported},
    }
    path = write_json({**document, "results": results}, started)
    print(f"\nresults written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
