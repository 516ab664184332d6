"""What every benchmark mode shares: its command-line types, the Redis it runs on, the
environment it records, and how its files are named and written.

A mode is one module (`benchmarks.cycles`, `benchmarks.failover`, ...) with a
`main(argv)`; `benchmarks.run` only picks the module. Modes build on this module,
`targets`, `load`, `proc` and `report`, and never import each other.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis

from benchmarks.report import save
from quorum_quest.config.settings import LoggerSettings
from quorum_quest.telemetry.logging import configure_logging
from tests.backends.cassandra import CASSANDRA_VERSION
from tests.backends.dynamodb import DYNALITE_VERSION
from tests.backends.redis import RedisProcess

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESULTS_DIR = Path(__file__).parent / "results"
RUN_COMMAND = "uv run python -m benchmarks.run"
DEFAULT_MODE = "cycles"  # the mode run without --mode


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


def mode_parser(mode: str, description: str) -> argparse.ArgumentParser:
    """A mode's parser, named as `benchmarks.run` calls it, with --results-dir."""
    prog = RUN_COMMAND if mode == DEFAULT_MODE else f"{RUN_COMMAND} --mode {mode}"
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where the JSON, Markdown and PNG files go; default benchmarks/results",
    )
    return parser


def add_redis_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        type=loopback_url,
        default=None,
        help="a Redis on 127.0.0.1 to use; default: start a throw-away redis-server",
    )


def command_line(mode: str, argv: Sequence[str]) -> str:
    """The command that runs `mode` with `argv` again, for the files' headers."""
    chosen = [] if mode == DEFAULT_MODE else ["--mode", mode]
    return " ".join([RUN_COMMAND, *chosen, *argv])


# -- running --------------------------------------------------------------------------


def quiet_logging() -> None:
    """Only the SDK's and the stores' warnings in the harness's stderr, beside progress."""
    configure_logging(LoggerSettings(level="WARNING"))


@contextmanager
def redis_for(url: str | None, needed: bool = True) -> Iterator[str | None]:
    """The Redis URL to use: `url`, a started redis-server, or None if not `needed`.

    The redis-server is started in the caller's thread and dies with it.
    """
    if not needed:
        yield None
    elif url:
        yield url
    else:
        with RedisProcess() as server:
            yield server.url


def environment(redis_url: str | None, targets: Sequence[str] = ()) -> dict[str, Any]:
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


def loads(values: Sequence[float]) -> str:
    """Load averages (1, 5, 15 min) as text."""
    return ", ".join(f"{value:.2f}" for value in values)


def stem(started: datetime, mode: str) -> str:
    """The files' name: the start time, and the mode but for the default one."""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    return stamp if mode == DEFAULT_MODE else f"{stamp}-{mode}"


def publish(
    results_dir: Path,
    mode: str,
    title: str,
    started: datetime,
    document: dict[str, Any],
    text: str,
    chart: Callable[[Figure], None],
) -> list[Path]:
    """Print `text` (the tables), then write the run's JSON, Markdown and PNG files.

    The Markdown file is `text` under a title and the command (`document["command"]`).
    """
    print("\n" + text)
    markdown = f"# {title} {started:%Y-%m-%d %H:%M:%S} UTC\n\n`{document['command']}`\n\n{text}"
    paths = save(results_dir, stem(started, mode), document, markdown, chart)
    print(f"\nresults written to {', '.join(map(str, paths))}", file=sys.stderr)
    return paths
