"""The harness's `+tls` targets run end to end over TLS with a token. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_benchmark_smoke import run_harness


def test_cycles_memory_with_and_without_tls_and_tokens(tmp_path: Path) -> None:
    document = run_harness(
        tmp_path,
        *("--targets", "memory,memory+tls", "--scenarios", "distinct", "--clients", "1"),
        *("--duration", "0.3", "--warmup", "0.1"),
    )
    results = document["results"]
    assert [r["target"] for r in results] == ["memory", "memory+tls"]
    # Every call of the secured target was identified and allowed: no errors, no losses.
    assert all(r["errors"] == 0 and not r["lost"] and r["cycles_per_s"] > 0 for r in results)
    (ratio,) = document["security"]["ratios"]
    assert ratio["target"] == "memory+tls" and ratio["ratio"] > 0
    table = next(tmp_path.glob("*.md")).read_text(encoding="utf-8")
    assert "memory+tls / memory" in table
