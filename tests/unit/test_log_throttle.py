"""`ThrottledLog`: a repeating failure is written once at once, then counted per interval."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loguru import logger

from quorum_quest.telemetry.logging import ThrottledLog

INTERVAL = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines() -> Iterator[list[str]]:
    written: list[str] = []
    sink = logger.add(lambda message: written.append(message.strip()), format="{level} {message}")
    yield written
    logger.remove(sink)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def log(clock: Clock) -> ThrottledLog:
    return ThrottledLog(INTERVAL, clock=clock)


def test_the_first_occurrence_is_written_at_once(log: ThrottledLog, lines: list[str]) -> None:
    log.log("WARNING", "redis failed", "store call failed: {}", "connection refused")
    assert lines == ["WARNING store call failed: connection refused"]


def test_repeats_within_the_interval_are_counted_not_written(
    log: ThrottledLog, clock: Clock, lines: list[str]
) -> None:
    for attempt in range(3635):
        log.log("WARNING", "redis failed", "store call failed: {}", attempt)
        clock.now += 0.001
    log.flush()  # 3.6 s after the first: nothing is due yet
    assert lines == ["WARNING store call failed: 0"]


def test_a_count_is_written_once_the_interval_has_passed(
    log: ThrottledLog, clock: Clock, lines: list[str]
) -> None:
    for attempt in range(5):
        log.log("WARNING", "redis failed", "store call failed: {}", attempt)
    clock.now += INTERVAL
    log.flush()
    log.flush()  # nothing new: nothing more
    assert lines == [
        "WARNING store call failed: 0",
        "WARNING store call failed: 4 (4 times in the last 10 s)",
    ]


def test_an_occurrence_after_the_interval_brings_the_count_with_it(
    log: ThrottledLog, clock: Clock, lines: list[str]
) -> None:
    log.log("WARNING", "redis failed", "store call failed: {}", "a")
    clock.now += 1
    log.log("WARNING", "redis failed", "store call failed: {}", "b")
    clock.now += INTERVAL
    log.log("WARNING", "redis failed", "store call failed: {}", "c")
    assert lines == [
        "WARNING store call failed: a",
        "WARNING store call failed: c (2 times in the last 11 s)",
    ]


def test_a_kind_quiet_for_an_interval_is_written_at_once_again(
    log: ThrottledLog, clock: Clock, lines: list[str]
) -> None:
    log.log("WARNING", "redis failed", "store call failed: {}", "first outage")
    clock.now += INTERVAL + 1
    log.flush()
    log.log("WARNING", "redis failed", "store call failed: {}", "second outage")
    assert lines == [
        "WARNING store call failed: first outage",
        "WARNING store call failed: second outage",
    ]


def test_kinds_are_counted_apart(log: ThrottledLog, clock: Clock, lines: list[str]) -> None:
    for _ in range(3):
        log.log("WARNING", "redis failed", "store call failed")
        log.log("WARNING", "undecodable", "bad request refused")
    clock.now += INTERVAL
    log.flush()
    assert sorted(lines) == [
        "WARNING bad request refused",
        "WARNING bad request refused (2 times in the last 10 s)",
        "WARNING store call failed",
        "WARNING store call failed (2 times in the last 10 s)",
    ]


def test_flushing_everything_writes_the_counts_not_yet_due(
    log: ThrottledLog, clock: Clock, lines: list[str]
) -> None:
    log.log("INFO", "redis contended", "store call contended")
    log.log("INFO", "redis contended", "store call contended")
    clock.now += 2
    log.flush(everything=True)
    assert lines == [
        "INFO store call contended",
        "INFO store call contended (1 time in the last 2 s)",
    ]


def test_a_suppressed_message_is_never_formatted(log: ThrottledLog, lines: list[str]) -> None:
    class Costly:
        formatted = 0

        def __str__(self) -> str:
            Costly.formatted += 1
            return "costly"

    for _ in range(100):
        log.log("WARNING", "kind", "{}", Costly())
    assert Costly.formatted == 1
