"""The ghz mode: the service's unary calls under ghz, a load generator written in Go, so
that the client is not what limits the rate (in the cycles mode one Python process
drives every client, and on 2 cores it costs about as much CPU per call as the service).

uv run python -m benchmarks.run --mode ghz [--targets memory,redis]
    [--scenarios acquire,keep-alive] [--concurrency 50] [--connections 1]
    [--duration 10] [--warmup 1] [--rounds 3] [--timeout 2] [--ghz PATH]
    [--redis-url redis://127.0.0.1:6379/0] [--results-dir DIR]

(the same as `python -m benchmarks.ghz` with those options). ghz is `--ghz`, else `ghz`
on PATH, else `ghz-<GHZ_VERSION>` in ~/.cache/quorum-quest/bin (`$XDG_CACHE_HOME` if
set), else it is built there first with `go install
github.com/bojand/ghz/cmd/ghz@<GHZ_VERSION>` (`go` on PATH or /usr/local/go/bin/go;
about a minute, once per machine).

The targets are started as the cycles mode starts them (`benchmarks.targets`), all at
once and kept for the whole run. ghz calls one method per run, `--concurrency` calls in
flight at all times over `--connections` HTTP/2 connections, from the proto file
(`protos/`), in plaintext on 127.0.0.1:

- `acquire`: TryAcquireLock, each request on a lock of its own (domain
  `<run>-{{.RequestNumber}}`, ghz's request counter): every call is the grant of a free
  lock, the store's write path;
- `keep-alive`: KeepAlive of `--concurrency` locks the harness acquired first, the
  requests going round-robin over them (ghz's data array). A refused renewal is an OK
  answer without a lease, which ghz cannot tell apart, so after the run the harness
  renews each lock once more and counts those still held (`held after`).

Each round runs every (target, scenario) in turn, in reverse order every other round
(so a drift of the machine's load hits all of them alike): ghz for `--warmup` seconds
(not counted), then ghz for `--duration` seconds, measured. From ghz's JSON report:
answered calls (status OK), their rate over ghz's own run time, the p50 / p99 latency
of the OK calls, and the calls answered with another status. CPU seconds (user +
system) from just before the measured ghz starts to its exit: the target's server
process tree and redis-server (`/proc`, as the other modes read them), and ghz's own
(`getrusage` of this process's reaped children: ghz is the only one reaped meanwhile).
The tables show medians over the rounds and their range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
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
from benchmarks.proc import CpuProbe, cpu_per_call, cpu_used, redis_pid
from benchmarks.report import median_range, shown
from benchmarks.targets import (
    REPO_ROOT,
    SDK,
    SECURED,
    TARGETS,
    TTL_MS,
    WHERE,
    ServiceTarget,
    on_redis,
    open_target,
    target_cpu_probe,
)
from quorum_quest._rpc import SERVICE_NAME
from quorum_quest.stores import LockKey

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODE = "ghz"
# ghz's newest release, built from the Go module proxy like any Go module.
GHZ_VERSION = "v0.120.0"
GHZ_PACKAGE = "github.com/bojand/ghz/cmd/ghz"
GO_FALLBACK = Path("/usr/local/go/bin/go")  # where Go installs itself, not always on PATH
INSTALL_TIMEOUT_S = 900.0  # a cold `go install`: download and compile ghz's modules
PROTOS = REPO_ROOT / "protos"  # the import path of the contract
PROTO = PROTOS / "quorum" / "quest" / "api" / "v1" / "quorum_quest_api.proto"
# Targets ghz can call: a service (or echo) over plaintext gRPC, no token.
GHZ_TARGETS = tuple(name for name in TARGETS if name not in ("redis-direct", *SDK, *SECURED))
SCENARIOS = {"acquire": "TryAcquireLock", "keep-alive": "KeepAlive"}
ROLES = ("server", "redis", "ghz")  # whose CPU is read over a measured run
SERVICE = "qq-bench"
GHZ_GRACE_S = 60.0  # a ghz run's time limit past its duration: start, connect, last calls


@dataclass(frozen=True, slots=True)
class GhzSettings:
    scenarios: tuple[str, ...]
    concurrency: int  # calls in flight at all times
    connections: int  # HTTP/2 connections they share
    duration: float  # seconds measured per run
    warmup: float  # seconds of ghz before each measured run, not counted
    timeout: float  # seconds per call
    rounds: int


# -- finding or building ghz ---------------------------------------------------------


def cached_ghz() -> Path:
    """Where ghz is built for this machine: the project's cache, outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quorum-quest" / "bin" / f"ghz-{GHZ_VERSION}"


def go_command() -> Path | None:
    found = shutil.which("go")
    if found:
        return Path(found)
    return GO_FALLBACK if GO_FALLBACK.exists() else None


def ghz_binary(given: Path | None = None) -> Path:
    """ghz to run: `given`, else on PATH, else the cached build, else built now."""
    if given is not None:
        return given
    if found := shutil.which("ghz"):
        return Path(found)
    cached = cached_ghz()
    if cached.exists():
        return cached
    go = go_command()
    if go is None:
        raise RuntimeError(
            "ghz is not on PATH nor in the cache, and no Go toolchain (go) is installed "
            "to build it: install Go, or pass --ghz PATH"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    print(f"building ghz {GHZ_VERSION} into {cached} (go install) ...", file=sys.stderr)
    # Built into a directory of its own, then renamed: a build that fails or runs twice
    # at once never leaves a half-written binary under the cached name.
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".ghz-build-") as gobin:
        env = {**os.environ, "GOBIN": gobin}
        done = subprocess.run(
            [str(go), "install", f"{GHZ_PACKAGE}@{GHZ_VERSION}"],
            cwd=cached.parent,  # in no Go module: not the repository's, not another's
            env=env,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"go install {GHZ_PACKAGE}@{GHZ_VERSION} failed:\n{done.stderr}")
        os.replace(Path(gobin) / "ghz", cached)
    return cached


def ghz_version(ghz: Path) -> str:
    """What to record about ghz: the version built here, or what `ghz --version` says."""
    if ghz.name == f"ghz-{GHZ_VERSION}":
        return GHZ_VERSION
    done = subprocess.run([str(ghz), "--version"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or done.stderr.strip()


# -- one run -------------------------------------------------------------------------


def ghz_command(
    ghz: Path, address: str, scenario: str, data: Any, seconds: float, settings: GhzSettings
) -> list[str]:
    """ghz calling `scenario`'s method on `address` for `seconds`, answering in JSON.

    `--duration-stop wait`: the calls in flight when the time is up are awaited and
    counted, not cut off and reported as errors.
    """
    return [
        str(ghz),
        "--insecure",
        *("--proto", str(PROTO), "--import-paths", str(PROTOS)),
        *("--call", f"{SERVICE_NAME}.{SCENARIOS[scenario]}"),
        *("--data", json.dumps(data)),
        *("--concurrency", str(settings.concurrency)),
        *("--connections", str(settings.connections)),
        *("--duration", f"{seconds}s", "--duration-stop", "wait"),
        *("--timeout", f"{settings.timeout}s"),
        *("--format", "json"),
        address,
    ]


def children_cpu() -> float:
    """User + system CPU seconds of this process's children that ended and were reaped."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


async def run_ghz(command: list[str], limit: float) -> tuple[dict[str, Any], float]:
    """ghz's report (without its per-call details), and the CPU seconds ghz used."""
    before = children_cpu()
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"ghz did not finish in {limit:g} s") from None
    used = children_cpu() - before
    if process.returncode != 0:
        raise RuntimeError(f"ghz exited with code {process.returncode}: {err.decode()}")
    report = json.loads(out)
    report.pop("details", None)  # one entry per call
    return report, used


def acquire_data(tag: str) -> dict[str, Any]:
    """A TryAcquireLock request whose lock is new for each request of one ghz run."""
    return {
        "service": SERVICE,
        "domain": f"{tag}-{{{{.RequestNumber}}}}",
        "client_id": "ghz-{{.WorkerID}}",
        "ttl_ms": TTL_MS,
    }


def keep_alive_data(locks: Sequence[tuple[LockKey, str]]) -> list[dict[str, Any]]:
    """KeepAlive requests for `locks` (key, holder): ghz sends them round-robin."""
    return [
        {"service": key.service, "domain": key.domain, "client_id": holder, "ttl_ms": TTL_MS}
        for key, holder in locks
    ]


def latency_ms(report: dict[str, Any], percentage: int) -> float | None:
    """ghz's `percentage` latency of the OK calls, in ms; None without any."""
    for entry in report.get("latencyDistribution") or ():
        if entry["percentage"] == percentage:
            return float(entry["latency"]) / 1e6
    return None


async def measured(
    target: ServiceTarget,
    scenario: str,
    data: tuple[Any, Any],
    probe: CpuProbe,
    ghz: Path,
    settings: GhzSettings,
) -> dict[str, Any]:
    """A warm-up ghz run with `data[0]`, then the measured one with `data[1]`: its numbers,
    and the CPU used while it ran."""
    limit = max(settings.duration, settings.warmup) + settings.timeout + GHZ_GRACE_S
    warmup, measured_data = data
    if settings.warmup > 0:
        command = ghz_command(ghz, target.address, scenario, warmup, settings.warmup, settings)
        await run_ghz(command, limit)
    command = ghz_command(ghz, target.address, scenario, measured_data, settings.duration, settings)
    before = probe()
    report, ghz_cpu = await run_ghz(command, limit)
    cpu = cpu_used(before, probe())
    del cpu["client"]  # this process only waited for ghz
    cpu["ghz"] = ghz_cpu
    codes = report.get("statusCodeDistribution") or {}
    answered = codes.get("OK", 0)
    seconds = report["total"] / 1e9
    return {
        "target": target.name,
        "scenario": scenario,
        "duration_s": seconds,
        "calls": answered,
        "calls_per_s": answered / seconds,
        "latency_ms": {"p50": latency_ms(report, 50), "p99": latency_ms(report, 99)},
        "errors": report["count"] - answered,
        "error_kinds": {code: n for code, n in codes.items() if code != "OK"},
        "ghz_errors": report.get("errorDistribution") or {},
        "cpu_s": cpu,
        "cpu_us_per_call": cpu_per_call(cpu, answered),
    }


async def one_run(
    target: ServiceTarget, scenario: str, probe: CpuProbe, ghz: Path, settings: GhzSettings
) -> dict[str, Any]:
    """One measured ghz run of `scenario` on `target`, with what it needs set up."""
    if scenario == "acquire":
        # A tag per ghz run: the measured run's locks are not the warm-up's, still held.
        data = (acquire_data(uuid.uuid4().hex[:8]), acquire_data(uuid.uuid4().hex[:8]))
        return await measured(target, scenario, data, probe, ghz, settings)
    tag = uuid.uuid4().hex[:8]
    locks = [
        (LockKey(SERVICE, f"{tag}-held-{i}"), f"ghz-holder-{i}")
        for i in range(settings.concurrency)
    ]
    session = await target.open_session()
    try:
        granted = await asyncio.gather(*(session.acquire(key, holder) for key, holder in locks))
        if not all(granted):
            raise RuntimeError(f"{target.name}: {granted.count(False)} locks were not granted")
        renewals = keep_alive_data(locks)
        row = await measured(target, scenario, (renewals, renewals), probe, ghz, settings)
        still = await asyncio.gather(*(session.keep_alive(key, holder) for key, holder in locks))
        row["held_after"] = sum(still)
        await asyncio.gather(*(session.release(key, holder) for key, holder in locks))
    finally:
        await session.close()
    return row


def progress_line(round_: int, row: dict[str, Any]) -> str:
    held = f", {row['held_after']} held after" if "held_after" in row else ""
    server = row["cpu_us_per_call"].get("server")
    return (
        f"ghz round {round_}: {row['target']:>8} {row['scenario']:>10}: "
        f"{row['calls_per_s']:.0f} calls/s, server {number(server, 0)} µs/call, "
        f"p50 {number(row['latency_ms']['p50'])} ms, {row['errors']} errors{held}"
    )


async def run_rounds(
    targets: Sequence[str], settings: GhzSettings, redis_url: str | None, ghz: Path
) -> list[dict[str, Any]]:
    """Every round of every (target, scenario); the targets are started once, together."""
    run_id = uuid.uuid4().hex[:8]
    redis = await redis_pid(redis_url) if redis_url else None
    if redis_url and redis is None:
        print(f"no redis-server of {redis_url} in /proc: no redis CPU", file=sys.stderr)
    rows = []
    async with AsyncExitStack() as stack:
        started = {}
        for name in targets:
            target = await stack.enter_async_context(
                open_target(
                    name,
                    redis_url=redis_url,
                    run_id=run_id,
                    timeout=settings.timeout,
                    trace_sample_ratio=0.0,
                )
            )
            assert isinstance(target, ServiceTarget)  # GHZ_TARGETS are services over gRPC
            started[name] = (target, target_cpu_probe(target, redis))
        runs = [(name, scenario) for name in targets for scenario in settings.scenarios]
        for round_ in range(1, settings.rounds + 1):
            for name, scenario in runs if round_ % 2 else reversed(runs):
                target, probe = started[name]
                row = {"round": round_, **await one_run(target, scenario, probe, ghz, settings)}
                print(progress_line(round_, row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


# -- the summary and the tables --------------------------------------------------------


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (target, scenario), over the rounds: medians and ranges, errors summed."""
    summary = []
    for cell in dict.fromkeys((row["target"], row["scenario"]) for row in rows):
        mine = [row for row in rows if (row["target"], row["scenario"]) == cell]
        roles = dict.fromkeys(role for row in mine for role in row["cpu_us_per_call"])
        summary.append(
            {
                "target": cell[0],
                "scenario": cell[1],
                "rounds": len(mine),
                "calls_per_s": median_range([row["calls_per_s"] for row in mine]),
                "cpu_us_per_call": {
                    role: median_range([row["cpu_us_per_call"].get(role) for row in mine])
                    for role in roles
                },
                "p50_ms": median_range([row["latency_ms"]["p50"] for row in mine]),
                "p99_ms": median_range([row["latency_ms"]["p99"] for row in mine]),
                "errors": sum(row["errors"] for row in mine),
                "held_after": min(
                    (row["held_after"] for row in mine if "held_after" in row), default=None
                ),
            }
        )
    return summary


def role_shown(per_call: dict[str, Any], name: str, digits: int = 0) -> str:
    """A role's CPU µs per call; n/a where the target has no such process."""
    return shown(per_call[name], digits) if name in per_call else "n/a"


COLUMNS = (
    "target",
    "scenario",
    "calls/s",
    "server CPU µs/call",
    "redis CPU µs/call",
    "ghz CPU µs/call",
    "p50 ms",
    "p99 ms",
    "errors",
    "held after",
)


def table(summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str:
    """The medians (min–max) over the rounds per (target, scenario), then every run."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for s in summary:
        cpu = s["cpu_us_per_call"]
        cells = (
            s["target"],
            s["scenario"],
            shown(s["calls_per_s"]),
            role_shown(cpu, "server"),
            role_shown(cpu, "redis"),
            role_shown(cpu, "ghz"),
            shown(s["p50_ms"], 2),
            shown(s["p99_ms"], 2),
            str(s["errors"]),
            "n/a" if s["held_after"] is None else str(s["held_after"]),
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "\nRuns, in the order they ran:\n",
        "| round | target | scenario | calls | calls/s | server / redis / ghz CPU µs/call "
        "| p50 / p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cpu = row["cpu_us_per_call"]
        per_call = " / ".join("n/a" if role not in cpu else number(cpu[role], 0) for role in ROLES)
        latency = row["latency_ms"]
        lines.append(
            f"| {row['round']} | {row['target']} | {row['scenario']} | {row['calls']} | "
            f"{row['calls_per_s']:.0f} | {per_call} | {number(latency['p50'])} / "
            f"{number(latency['p99'])} | {row['errors']} |"
        )
    troubled = [row for row in rows if row["errors"]]
    if troubled:
        lines.append("\nErrors (status: calls; then ghz's messages):\n")
    for row in troubled:
        kinds = ", ".join(f"{code} x{n}" for code, n in sorted(row["error_kinds"].items()))
        first = next(iter(row["ghz_errors"]), "")
        lines.append(
            f"- round {row['round']}, {row['target']} / {row['scenario']}: {kinds}; {first}"
        )
    return "\n".join(lines)


# The chart's panels: (title, the value of a run)
PANELS: tuple[tuple[str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("calls/s", lambda row: row["calls_per_s"]),
    ("server CPU µs per call", lambda row: row["cpu_us_per_call"].get("server")),
)


def chart(rows: Sequence[dict[str, Any]]) -> Callable[[Figure], None]:
    """Per (target, scenario): each round's calls/s and server CPU µs/call, and the median."""

    def draw(figure: Figure) -> None:
        cells = list(dict.fromkeys((row["target"], row["scenario"]) for row in rows))
        labels = [f"{target}\n{scenario}" for target, scenario in cells]
        for ax, (title, value) in zip(figure.subplots(1, 2), PANELS, strict=True):
            for place, cell in enumerate(cells):
                values = [
                    v
                    for row in rows
                    if (row["target"], row["scenario"]) == cell and (v := value(row)) is not None
                ]
                if values:
                    ax.bar(place, statistics.median(values), 0.6, color="C0", alpha=0.4)
                    ax.plot([place] * len(values), values, "o", color="C0")
            ax.set_xticks(range(len(cells)), labels)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{title}: rounds (dots), median (bar)")
            ax.grid(axis="y", alpha=0.3)

    return draw


# -- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = mode_parser(MODE, __doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "--targets",
        type=names(GHZ_TARGETS),
        default=["memory", "redis"],
        help=f"from {','.join(GHZ_TARGETS)}; default memory,redis",
    )
    parser.add_argument(
        "--scenarios",
        type=names(tuple(SCENARIOS)),
        default=list(SCENARIOS),
        help="acquire (TryAcquireLock, a new lock per call) and/or keep-alive (KeepAlive)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=50, help="calls in flight at all times; default 50"
    )
    parser.add_argument(
        "--connections", type=int, default=1, help="HTTP/2 connections they share; default 1"
    )
    parser.add_argument(
        "--duration", type=positive, default=10.0, help="measured seconds per run; default 10"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of ghz before each run; default 1"
    )
    parser.add_argument("--timeout", type=positive, default=2.0, help="seconds per call")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all runs; default 3")
    parser.add_argument("--ghz", type=Path, default=None, help="the ghz binary to run")
    add_redis_url(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--rounds and --concurrency must be at least 1, --warmup not negative")
    if not 1 <= args.connections <= args.concurrency:
        parser.error("--connections must be between 1 and --concurrency")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    quiet_logging()
    started = datetime.now(UTC)
    ghz = ghz_binary(args.ghz)
    settings = GhzSettings(
        scenarios=tuple(args.scenarios),
        concurrency=args.concurrency,
        connections=args.connections,
        duration=args.duration,
        warmup=args.warmup,
        timeout=args.timeout,
        rounds=args.rounds,
    )
    load_before = os.getloadavg()
    with redis_for(args.redis_url, any(map(on_redis, args.targets))) as redis_url:
        rows = asyncio.run(run_rounds(args.targets, settings, redis_url, ghz))
        env = environment(redis_url, args.targets)
    env["ghz"] = ghz_version(ghz)
    env["load_average"] = {"before": load_before, "after": os.getloadavg()}
    summary = summarize(rows)
    where = {name: WHERE[name] for name in args.targets}
    text = (
        f"ghz ({env['ghz']}): {settings.concurrency} calls in flight over "
        f"{settings.connections} connection(s), {settings.duration:g} s measured per run "
        f"after {settings.warmup:g} s of warm-up, {settings.timeout:g} s per call; "
        f"{settings.rounds} rounds, the runs in reverse order every other round. "
        "acquire: TryAcquireLock of a new lock per call (all granted); keep-alive: "
        f"KeepAlive round-robin over {settings.concurrency} held locks (held after: how "
        "many were still held at the end). calls/s: OK answers ÷ ghz's run time; p50 / "
        "p99: of the OK calls (ghz). CPU µs/call: user + system CPU seconds while the measured ghz "
        "ran ÷ OK calls, of the target's server process tree and redis-server (/proc) and "
        f"of ghz (getrusage); {env['cpus']} CPUs shared by ghz, the service and "
        "redis-server. Median (min–max) over the rounds.\n\n"
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
            **{key: getattr(settings, key) for key in GhzSettings.__dataclass_fields__},
        },
        "environment": env,
        "targets": where,
        "ghz": {"summary": summary, "runs": rows},
    }
    publish(args.results_dir, MODE, "ghz", started, document, text, chart(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
