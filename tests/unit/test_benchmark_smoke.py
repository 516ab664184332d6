"""The benchmark harness runs end to end and writes its files. No timing is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.ghz import INSTALL_TIMEOUT_S, cached_ghz, ghz_binary, go_command

ROOT = Path(__file__).parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Generous: a loaded 2-core machine starts Python processes slowly. No timing is judged.
HARNESS_TIMEOUT_S = 270


def run_harness(results: Path, *args: str) -> dict:
    """`python -m benchmarks.run ARGS` into `results`; its one JSON document."""
    command = [sys.executable, "-m", "benchmarks.run", "--results-dir", str(results), *args]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=HARNESS_TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout + done.stderr
    files = {path.suffix: path for path in results.iterdir()}
    assert sorted(files) == [".json", ".md", ".png"], files
    assert files[".png"].read_bytes().startswith(PNG_MAGIC)
    assert files[".md"].read_text(encoding="utf-8").strip()
    return json.loads(files[".json"].read_text(encoding="utf-8"))


def test_cycles_memory_and_echo(tmp_path: Path) -> None:
    document = run_harness(
        tmp_path,
        *("--targets", "memory,echo", "--scenarios", "distinct", "--clients", "1"),
        *("--duration", "0.3", "--warmup", "0.1"),
    )
    results = document["results"]
    assert [r["target"] for r in results] == ["memory", "echo"]
    assert all(r["errors"] == 0 and not r["lost"] and r["cycles_per_s"] > 0 for r in results)
    assert all(r["cpu_us_per_call"]["server"] > 0 for r in results)
    assert all(r["cpu_us_per_call"]["client"] > 0 for r in results)
    assert [row["target"] for row in document["ceiling"]] == ["memory"]
    assert document["ceiling"][0]["total_cpu_ratio"] > 0
    table = next(tmp_path.glob("*.md")).read_text(encoding="utf-8")
    assert "| echo | distinct | 1 |" in table and "calls/s ÷ echo" in table
    assert "server CPU µs/call" in table and "total CPU ÷ echo" in table


@pytest.mark.redis
@pytest.mark.timeout(HARNESS_TIMEOUT_S + 30)
def test_failover(tmp_path: Path) -> None:
    document = run_harness(
        tmp_path, *("--mode", "failover", "--ttl", "3", "--rounds", "1", "--settle", "0.3")
    )
    rounds = document["failover"]["rounds"]
    assert [r["case"] for r in rounds] == ["kill", "graceful", "graceful-across"]
    assert all(r["unheld_ms"] >= 0 for r in rounds)
    assert "graceful exit" in next(tmp_path.glob("*.md")).read_text(encoding="utf-8")


@pytest.mark.redis
def test_workers(tmp_path: Path) -> None:
    document = run_harness(
        tmp_path,
        *("--mode", "workers", "--workers", "1,2", "--load-processes", "2", "--clients", "2"),
        *("--duration", "1", "--warmup", "0.2", "--rounds", "1"),
    )
    runs = document["workers"]["runs"]
    assert [r["workers"] for r in runs] == [1, 2]
    assert all(r["errors"] == 0 and not r["lost"] and r["calls_per_s"] > 0 for r in runs)
    assert [len(r["connections_per_worker"]) for r in runs] == [1, 2]
    assert all(r["cpu_s"]["service"] > 0 and r["cpu_s"]["load"] > 0 for r in runs)
    assert "÷ 1 worker" in next(tmp_path.glob("*.md")).read_text(encoding="utf-8")


@pytest.mark.redis
def test_many_leases(tmp_path: Path) -> None:
    document = run_harness(
        tmp_path, *("--mode", "many-leases", "--leases", "20", "--ttl", "3", "--duration", "1")
    )
    [row] = document["results"]
    assert row["leases"] == 20 and row["sustained"]


def test_watch(tmp_path: Path) -> None:
    document = run_harness(
        tmp_path,
        *("--mode", "watch", "--cycles", "5", "--watchers", "1", "--streams", "20"),
        *("--step", "20", "--load-processes", "1", "--idle", "0.5", "--rounds", "1"),
        *("--deliver-timeout", "60"),
    )
    summary = document["watch"]["summary"]
    # No speed is judged; that every change was seen (or flagged as a gap) is.
    assert summary["latency"]["deliveries"] > 0 and summary["latency"]["lost"] == 0
    for form in summary["streams"].values():
        assert form["opened"] == form["streams"] == 20 and form["lost"] == 0, form


@pytest.mark.timeout(INSTALL_TIMEOUT_S + HARNESS_TIMEOUT_S + 30)
def test_ghz(tmp_path: Path) -> None:
    if go_command() is None and shutil.which("ghz") is None and not cached_ghz().exists():
        pytest.skip("no ghz, and no Go toolchain (go) to build it")
    ghz = ghz_binary()  # built into the cache on the first run, reused after
    document = run_harness(
        tmp_path,
        *("--mode", "ghz", "--targets", "memory", "--concurrency", "4", "--rounds", "1"),
        *("--duration", "0.5", "--warmup", "0.2", "--ghz", str(ghz)),
    )
    runs = document["ghz"]["runs"]
    assert [(r["target"], r["scenario"]) for r in runs] == [
        ("memory", "acquire"),
        ("memory", "keep-alive"),
    ]
    assert all(r["calls"] > 0 and r["errors"] == 0 and r["cpu_s"]["ghz"] > 0 for r in runs)
    assert runs[1]["held_after"] == 4  # every renewed lock was still held
    table = next(tmp_path.glob("*.md")).read_text(encoding="utf-8")
    assert "| memory | acquire |" in table and "server CPU µs/call" in table


def test_sdk_cycles(tmp_path: Path) -> None:
    document = run_harness(
        tmp_path,
        *("--mode", "sdk-cycles", "--targets", "memory", "--clients", "4", "--rounds", "1"),
        *("--duration", "0.5", "--warmup", "0.2"),
    )
    runs = document["sdk_cycles"]["runs"]
    assert [(r["target"], r["transport"]) for r in runs] == [
        ("memory", "session"),
        ("memory", "unary"),
    ]
    for run in runs:
        assert run["operations"] > 0 and run["errors"] == 0 and not run["lost"], run
        assert run["fell_back"] == 0  # the session run used the Session stream
    table = next(tmp_path.glob("*.md")).read_text(encoding="utf-8")
    assert "| memory | operations/s |" in table and "session ÷ unary" in table
