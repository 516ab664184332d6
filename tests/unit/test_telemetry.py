"""The service's metrics as a Prometheus scrape shows them: buckets, zeros, no starved operation."""

from __future__ import annotations

import re
import time

from prometheus_client import CollectorRegistry, generate_latest

from quorum_quest.config.settings import ObservabilitySettings
from quorum_quest.telemetry.latency import LATENCY_BUCKETS_S
from quorum_quest.telemetry.telemetry import ACQUIRED, RELEASED, RESULTS, Telemetry

HISTOGRAM = "quorum_quest_lock_operation_duration_seconds"


def scraped(
    reloads: dict[str, int] | None = None, backend: str | None = "memory"
) -> tuple[Telemetry, CollectorRegistry]:
    """A Telemetry exporting to a Prometheus registry only, as with `prometheusPort` set."""
    registry = CollectorRegistry()
    telemetry = Telemetry(
        ObservabilitySettings(prometheusPort=9464),
        held_leases=lambda: 0,
        reloads=lambda: dict(reloads or {}),
        prometheus=registry,
    )
    if backend is not None:
        telemetry.expect_backend(backend)
    return telemetry, registry


def page(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`, or None."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
            if labels.items() <= found.items():
                return float(line.rsplit(" ", 1)[1])
    return None


def test_latency_histogram_has_bounds_from_100_microseconds_to_a_minute() -> None:
    telemetry, registry = scraped()
    telemetry.count("acquire", ACQUIRED, "memory", time.perf_counter())
    text = page(registry)
    bounds = [
        float(bound)
        for bound in re.findall(rf'^{HISTOGRAM}_bucket{{.*le="([^"]+)"', text, re.MULTILINE)
        if bound != "+Inf"
    ]
    assert bounds == list(LATENCY_BUCKETS_S)
    # A call of a few µs is in the first bucket, not in a catch-all one.
    assert sample(text, f"{HISTOGRAM}_bucket", operation="acquire", le="0.0001") == 1.0


def test_every_counter_series_of_the_store_is_at_zero_before_any_call() -> None:
    _, registry = scraped()
    text = page(registry)
    for operation, results in RESULTS.items():
        for result in results:
            value = sample(
                text,
                "quorum_quest_lock_operations_total",
                operation=operation,
                result=result,
                backend="memory",
            )
            assert value == 0.0, (operation, result)
        errors = sample(
            text, "quorum_quest_store_errors_total", operation=operation, backend="memory"
        )
        assert errors == 0.0, operation
    for result in ("applied", "rejected"):
        assert sample(text, "quorum_quest_config_reloads_total", result=result) == 0.0


def test_a_counted_call_moves_its_series_off_zero_and_leaves_the_others() -> None:
    telemetry, registry = scraped(reloads={"applied": 2})
    telemetry.count("release", RELEASED, "memory", time.perf_counter())
    text = page(registry)
    total = "quorum_quest_lock_operations_total"
    assert sample(text, total, operation="release", result=RELEASED) == 1.0
    assert sample(text, total, operation="acquire", result=ACQUIRED) == 0.0
    assert sample(text, "quorum_quest_config_reloads_total", result="applied") == 2.0
    assert sample(text, "quorum_quest_config_reloads_total", result="rejected") == 0.0


def test_an_acquire_release_loop_records_the_latency_of_both_operations() -> None:
    telemetry, registry = scraped()
    for _ in range(16):
        telemetry.count("acquire", ACQUIRED, "memory", time.perf_counter())
        telemetry.count("release", RELEASED, "memory", time.perf_counter())
    text = page(registry)
    assert sample(text, f"{HISTOGRAM}_count", operation="acquire") == 16.0
    assert sample(text, f"{HISTOGRAM}_count", operation="release") == 16.0


def test_a_second_backend_after_a_store_swap_gets_its_zeros_too() -> None:
    telemetry, registry = scraped()
    telemetry.count("acquire", ACQUIRED, "memory", time.perf_counter())
    telemetry.expect_backend("redis")
    text = page(registry)
    total = "quorum_quest_lock_operations_total"
    assert sample(text, total, operation="acquire", result=ACQUIRED, backend="memory") == 1.0
    assert sample(text, total, operation="acquire", result=ACQUIRED, backend="redis") == 0.0


def test_counts_carried_over_a_reload_keep_their_values() -> None:
    old, _ = scraped()
    old.count("acquire", ACQUIRED, "memory", time.perf_counter(), locks=3)
    new, registry = scraped(backend=None)
    new.carry_counts_from(old)
    new.expect_backend("memory")
    text = page(registry)
    total = "quorum_quest_lock_operations_total"
    assert sample(text, total, operation="acquire", result=ACQUIRED, backend="memory") == 3.0
    assert sample(text, total, operation="release", result=RELEASED, backend="memory") == 0.0
