"""A run's files (JSON, Markdown, PNG chart), the ceiling ratios, and medians over runs.

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


# -- charts ----------------------------------------------------------------------------


def cycles_chart(results: Sequence[Result]) -> Callable[[Figure], None]:
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


def failover_chart(
    rounds: Sequence[dict[str, Any]], expected_ms: dict[str, float]
) -> Callable[[Figure], None]:
    """Per case, each round's unheld time, its median, and the expected bound."""

    def draw(figure: Figure) -> None:
        cases = list(dict.fromkeys(r["case"] for r in rounds))
        for ax, case in zip(figure.subplots(1, len(cases), squeeze=False)[0], cases, strict=True):
            times = [r["unheld_ms"] for r in rounds if r["case"] == case]
            ax.plot(range(1, len(times) + 1), times, "o", label="round")
            ax.axhline(statistics.median(times), color="C1", label="median")
            if case in expected_ms:
                ax.axhline(expected_ms[case], color="C3", linestyle="--", label="expected bound")
            ax.set_ylim(bottom=0)
            ax.set_xticks(range(1, len(times) + 1))
            ax.set_xlabel("round")
            ax.set_ylabel("lock unheld, ms")
            ax.set_title(case)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")

    return draw


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


# -- medians over runs -------------------------------------------------------------------


def spread(values: Sequence[float], digits: int = 0) -> str:
    """median (min–max)"""
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}–{max(values):.{digits}f})"
    )


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
