"""A run's files (JSON, Markdown, PNG chart: each mode draws its own), the ceiling ratios,
and medians over runs.

python -m benchmarks.report RESULT.json [RESULT.json ...]

prints, per (target, scenario, clients), the median and range over those runs of
calls/s, cycles/s, calls/s ÷ echo calls/s and CPU per call (the server's, its ratio to
echo's, and redis-server's): the numbers to quote for a change.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Result = dict[str, Any]
CELL_ORDER = ("target", "scenario", "clients")


def save(
    directory: Path,
    stem: str,
    document: dict[str, Any],
    markdown: str,
    chart: Callable[[Figure], None],
) -> list[Path]:
    """`<stem>.json`, `<stem>.md` and `<stem>.png` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.{suffix}" for suffix in ("json", "md", "png")]
    paths[0].write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown + "\n", encoding="utf-8")
    from matplotlib.figure import Figure  # a second to import: only when a chart is drawn

    figure = Figure(figsize=(10, 4.2), dpi=90, layout="constrained")
    chart(figure)
    figure.savefig(paths[2])
    return paths


# -- the ceiling ---------------------------------------------------------------------


def ceiling_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Every other target's cell against the echo server's cell of the same scenario and size.

    `calls_ratio` is calls/s ÷ echo calls/s; `bound_cycles_per_s` is echo calls/s ÷ 3, the
    cycles/s the ceiling allows (a cycle is three calls). `server_cpu_ratio` and
    `total_cpu_ratio` are CPU µs per call of the server, and of all processes, ÷ echo's.
    """
    echo = {(r["scenario"], r["clients"]): r for r in results if r["target"] == "echo"}
    rows = []
    for r in results:
        reference = echo.get((r["scenario"], r["clients"]))
        if r["target"] == "echo" or not reference or not reference["calls_per_s"]:
            continue
        bound = reference["calls_per_s"] / 3
        rows.append(
            {
                **{key: r[key] for key in CELL_ORDER},
                "echo_calls_per_s": reference["calls_per_s"],
                "calls_ratio": r["calls_per_s"] / reference["calls_per_s"],
                "cycles_per_s": r["cycles_per_s"],
                "bound_cycles_per_s": bound,
                "cycles_of_bound": r["cycles_per_s"] / bound,
                "server_cpu_ratio": cpu_ratio(r, reference, "server"),
                "total_cpu_ratio": cpu_ratio(r, reference, "total"),
            }
        )
    return rows


def cpu_ratio(result: Result, echo: Result, role: str) -> float | None:
    """`role`'s CPU µs per call over echo's; None where either is unknown."""
    mine = result.get("cpu_us_per_call", {}).get(role)
    reference = echo.get("cpu_us_per_call", {}).get(role)
    return mine / reference if mine is not None and reference else None


# -- medians over runs -------------------------------------------------------------------


def spread(values: Sequence[float], digits: int = 0) -> str:
    """median (min–max)"""
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}–{max(values):.{digits}f})"
    )


def median_range(values: Sequence[float | None]) -> dict[str, float] | None:
    """The median, min and max of the known values (a JSON summary); None without any."""
    known = [value for value in values if value is not None]
    if not known:
        return None
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def shown(stats: dict[str, float] | None, digits: int = 0) -> str:
    """A `median_range` as median (min–max); - when unknown."""
    if stats is None:
        return "-"
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def over_runs(documents: Sequence[dict[str, Any]]) -> str:
    """One Markdown table: median (min–max) over the runs, per cell."""
    columns: dict[tuple[Any, ...], dict[str, list[float]]] = {}

    def add(cell: tuple[Any, ...], column: str, value: float | None) -> None:
        if value is not None:
            columns.setdefault(cell, {}).setdefault(column, []).append(value)

    for document in documents:
        for r in document["results"]:
            cell = tuple(r[key] for key in CELL_ORDER)
            add(cell, "calls", r["calls_per_s"])
            add(cell, "cycles", r["cycles_per_s"])
            for role in ("server", "redis"):
                add(cell, role, r.get("cpu_us_per_call", {}).get(role))
        for row in ceiling_rows(document["results"]):
            cell = tuple(row[key] for key in CELL_ORDER)
            add(cell, "ratio", row["calls_ratio"])
            add(cell, "server ratio", row["server_cpu_ratio"])
    lines = [
        f"Median (min–max) over {len(documents)} runs:\n",
        "| target | scenario | clients | calls/s | cycles/s | calls/s ÷ echo "
        "| server CPU µs/call | server CPU ÷ echo | redis CPU µs/call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, values in columns.items():

        def show(column: str, digits: int = 0, values: dict[str, list[float]] = values) -> str:
            return spread(values[column], digits) if column in values else "-"

        lines.append(
            f"| {' | '.join(map(str, cell))} | {show('calls')} | {show('cycles')} "
            f"| {show('ratio', 2)} | {show('server')} | {show('server ratio', 2)} "
            f"| {show('redis')} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    documents = [json.loads(Path(name).read_text(encoding="utf-8")) for name in argv]
    print(over_runs([d for d in documents if "results" in d]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
