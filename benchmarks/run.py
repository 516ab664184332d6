"""Run one benchmark mode; it prints its tables and saves them as JSON, Markdown and PNG.

uv run python -m benchmarks.run [--mode MODE] [the mode's options]
uv run python -m benchmarks.run --mode MODE --help     (the mode's options)

Each mode is a module of its own (`benchmarks.<module>`, also runnable as
`python -m benchmarks.<module>` with the same options); this command only picks it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from benchmarks.core import DEFAULT_MODE, RUN_COMMAND

# --mode -> (module, what it measures)
MODES = {
    "cycles": ("benchmarks.cycles", "targets x scenarios x clients, acquire/keep-alive/release"),
    "failover": ("benchmarks.failover", "how long a lock stays unheld after its leader goes"),
    "workers": ("benchmarks.workers", "the redis service with 1, 2, ... worker processes"),
    "many-leases": ("benchmarks.many_leases", "one SDK client renewing N leases in batches"),
    "watch": ("benchmarks.watch", "WatchLeaders change latency, and many idle streams"),
    "ghz": ("benchmarks.ghz", "the unary calls under ghz, a Go load generator"),
    "sdk-cycles": ("benchmarks.sdk_cycles", "SDK acquire/release: Session stream vs unary"),
}


def parser() -> argparse.ArgumentParser:
    modes = "\n".join(f"  {name:<12} {summary}" for name, (_, summary) in MODES.items())
    chooser = argparse.ArgumentParser(
        prog=RUN_COMMAND,
        description=__doc__.split("\n")[0],
        epilog=f"modes:\n{modes}\n\n{RUN_COMMAND} --mode MODE --help lists a mode's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    chooser.add_argument("--mode", choices=MODES, help=f"default {DEFAULT_MODE}")
    return chooser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chooser = parser()
    chosen, rest = chooser.parse_known_args(argv)
    if chosen.mode is None and {"-h", "--help"} & set(rest):
        chooser.print_help()
        return 0
    # Imported when chosen: a mode's own imports cost only its runs.
    mode = importlib.import_module(MODES[chosen.mode or DEFAULT_MODE][0])
    code: int = mode.main(rest)
    return code


if __name__ == "__main__":
    sys.exit(main())
