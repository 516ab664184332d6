"""The service's log stream: one record per line (flat JSON objects in JSON), stdlib records
routed into it, and grpc's noise about callers that left."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from grpc._cython import cygrpc
from loguru import logger
from opentelemetry.sdk.trace import TracerProvider

from quorum_quest.config.settings import LoggerSettings
from quorum_quest.telemetry.logging import configure_logging

# Where every line of the text format begins.
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}")
RELEASE = "/quorum.quest.api.v1.LeaderElectionService/ReleaseLock"


@contextmanager
def configured(**settings: str) -> Iterator[None]:
    """The service's logging, set up inside the test: its sink is the stderr capfd captures.

    Afterwards loguru writes to the process's own stderr, which outlives the test's."""
    configure_logging(LoggerSettings(**settings))
    try:
        yield
    finally:
        configure_logging(LoggerSettings())
        logger.remove()
        logger.add(sys.__stderr__)


def _grpc_could_not_send_the_reply() -> None:
    """What grpc.aio logs when the reply's batch fails because the call already ended."""
    try:
        raise cygrpc.ExecuteBatchError('Failed "execute_batch": (<SendMessageOperation>,)')
    except cygrpc.ExecuteBatchError:
        logging.getLogger("grpc._cython.cygrpc").exception(
            f"ExecuteBatchError raised in core by servicer method [{RELEASE}]"
        )


def test_a_message_with_a_newline_is_written_as_one_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with configured():
        logger.info("lock acquired: domain={}", "x\nINFO fake log line")
        logger.info("escape {} and separator {}", "\x1b[31mred", "a\u2028b")
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2 and all(RECORD_START.match(line) for line in lines), err
    assert "domain=x\\nINFO fake log line" in lines[0]
    assert "escape \\x1b[31mred and separator a\\u2028b" in lines[1]


def test_a_message_in_json_is_one_line_too(capfd: pytest.CaptureFixture[str]) -> None:
    with configured(format="json"):
        logger.info("domain={}", "x\nINFO fake")
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("{")


def test_printable_text_is_written_as_it_is(capfd: pytest.CaptureFixture[str]) -> None:
    with configured():
        logger.info("service=billing domain=é-ü/日本 client_id=a b")
    assert "service=billing domain=é-ü/日本 client_id=a b" in capfd.readouterr().err


def test_a_reply_the_caller_no_longer_waits_for_is_not_logged_as_an_error(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with configured():
        _grpc_could_not_send_the_reply()
    err = capfd.readouterr().err
    assert "ERROR" not in err and "Traceback" not in err and "ExecuteBatchError" not in err, err


def test_a_reply_not_sent_is_one_debug_line_naming_the_method(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with configured(level="DEBUG"):
        _grpc_could_not_send_the_reply()
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "DEBUG" in lines[0] and "reply not sent" in lines[0] and RELEASE in lines[0]


def test_other_errors_of_grpc_are_still_errors(capfd: pytest.CaptureFixture[str]) -> None:
    with configured():
        try:
            raise ValueError("a bug of ours")
        except ValueError:
            logging.getLogger("grpc._cython.cygrpc").exception(
                f"Unexpected [ValueError] raised by servicer method [{RELEASE}]"
            )
    err = capfd.readouterr().err
    assert "ERROR" in err and "Traceback" in err and "a bug of ours" in err


# -- JSON lines ---------------------------------------------------------------------

JSON_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _json_lines(err: str) -> list[dict[str, object]]:
    lines = err.splitlines()
    assert all(line.startswith("{") for line in lines), err
    return [json.loads(line) for line in lines]


def test_a_json_line_is_one_flat_object_with_the_conventional_keys_on_top(
    capfd: pytest.CaptureFixture[str],
) -> None:
    tracer = TracerProvider().get_tracer("test")
    with configured(format="json"), tracer.start_as_current_span("call") as span:
        logger.info("lock lost", service="billing", domain="eu", client_id="node-1")
    [line] = _json_lines(capfd.readouterr().err)
    context = span.get_span_context()
    assert line == {
        "time": line["time"],
        "level": "INFO",
        "message": "lock lost",
        "logger": __name__,
        "service": "billing",
        "domain": "eu",
        "client_id": "node-1",
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
    }
    assert JSON_TIME.match(str(line["time"])), line["time"]


def test_a_json_line_outside_a_span_has_no_trace_ids_and_no_path_thread_or_emoji(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with configured(format="json"):
        logger.bind(audit="grant", identity="alice").info("lock acquired é")
    err = capfd.readouterr().err
    [line] = _json_lines(err)
    assert set(line) == {"time", "level", "message", "logger", "audit", "identity"}
    assert line["message"] == "lock acquired é" and line["identity"] == "alice"
    assert err.isascii()  # non-ASCII escaped: no emoji, no character that ends a line
    assert __file__ not in err and "thread" not in err


def test_a_json_line_with_an_exception_keeps_its_traceback_in_one_field(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with configured(format="json"):
        try:
            raise ValueError("a bug of ours")
        except ValueError:
            logger.exception("store call failed")
    [line] = _json_lines(capfd.readouterr().err)
    assert line["level"] == "ERROR" and line["message"] == "store call failed"
    assert "Traceback" in str(line["exception"]) and "a bug of ours" in str(line["exception"])


def test_a_stdlib_record_joins_the_stream_under_its_logger_name_with_its_fields(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with configured(format="json"):
        logging.getLogger("quorum_quest.client").warning(
            "lost %s/%s", "billing", "eu", extra={"service": "billing", "domain": "eu"}
        )
        logging.getLogger("redis.connection").info("below the stdlib threshold")
    [line] = _json_lines(capfd.readouterr().err)
    assert line["logger"] == "quorum_quest.client" and line["level"] == "WARNING"
    assert line["message"] == "lost billing/eu"
    assert line["service"] == "billing" and line["domain"] == "eu"
