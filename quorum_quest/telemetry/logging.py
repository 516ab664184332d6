"""One log stream: loguru, with the standard `logging` records of libraries routed into it.

What the stream promises operators:

- one record is one line (in text and JSON alike): a character that is not printable —
  a newline, an escape sequence, U+2028 — is written escaped (`\\n`, `\\x1b`, `\\u2028`),
  so no text a caller chose can forge a line or drive a terminal;
- a failure that repeats (a store outage, a flood of bad requests) is written once at
  once, then at most once per `SUMMARY_INTERVAL_S` with a count (`ThrottledLog`);
- a reply grpc could not send because the call had already ended (the caller's deadline
  passed, or it cancelled) is the caller's business: DEBUG, not an ERROR with a traceback;
- in JSON (`logger.format: json`) a line is one flat object: `time` (UTC, RFC 3339, ms),
  `level`, `message`, `logger` first, then the record's structured fields at the top
  level — `service`, `domain`, `client_id` of the lock a line is about, `trace_id` and
  `span_id` inside a traced call, `identity` and `audit` on audit lines, `exception` with
  a traceback — each only where the line has it. No file path, thread or process id.
  (loguru's own `serialize=True` nests all that under `record` beside the text line.)
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from loguru import logger
from opentelemetry import trace

from quorum_quest.config.settings import LoggerSettings

# The longest a repeated failure goes unreported after its first line.
SUMMARY_INTERVAL_S = 10.0


# The attributes every `logging.LogRecord` has; any other was passed as `extra=`.
_BARE_RECORD = logging.LogRecord("", 0, "", 0, "", None, None)
_STANDARD_ATTRIBUTES = frozenset(_BARE_RECORD.__dict__) | {"message", "asctime", "taskName"}


class _ToLoguru(logging.Handler):
    """Forward a standard `logging` record (grpc, redis, the SDK's `quorum_quest.client`,
    ...) to loguru, under its logger's name, with its `extra=` fields as structured fields
    (the interception handler of loguru's documentation)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        fields = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
        }
        named = logger.patch(lambda loguru_record: loguru_record.update({"name": record.name}))
        if fields:
            named = named.bind(**fields)
        named.opt(exception=record.exc_info).log(level, record.getMessage())


# grpc.aio logs this, with a traceback, when it cannot send a reply or status because the
# call ended first; it says "if client closed, ignore" but learns of a deadline that
# passed only a moment after the send fails (src/python/grpcio/grpc/_cython/_cygrpc/aio/
# server.pyx.pxi, `_handle_exceptions`).
GRPC_LOGGER = "grpc._cython.cygrpc"
_REPLY_NOT_SENT = (
    "ExecuteBatchError raised in core by servicer method",
    "Failed sending error status from server",
)


class _ReplyNotSent(logging.Filter):
    """Lower grpc's "ExecuteBatchError raised in core" to one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_REPLY_NOT_SENT) and _is_execute_batch_error(record.exc_info):
            method = message[message.find("[") :] if "[" in message else ""
            record.msg = f"reply not sent, the call had already ended (deadline or cancel) {method}"
            record.args = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
        return True


def _is_execute_batch_error(exc_info: Any) -> bool:
    return bool(exc_info) and type(exc_info[1]).__name__ == "ExecuteBatchError"


_reply_not_sent = _ReplyNotSent()


TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DDTHH:mm:ss.SSSZ}</green> <level>{level: <7}</level> "
    "<cyan>{name}</cyan> {message}"
)


def one_line(text: str) -> str:
    """`text` with every character that is not printable escaped, as Python writes it."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _patch(record: Any) -> None:
    """Make every message one line; put the current span's ids on a record in a span."""
    record["message"] = one_line(record["message"])
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        record["extra"]["trace_id"] = format(context.trace_id, "032x")
        record["extra"]["span_id"] = format(context.span_id, "016x")


# A JSON line's keys, in this order, before the record's structured fields.
_CORE_KEYS = ("time", "level", "message", "logger")


def json_line(record: Any) -> str:
    """`record` as one flat JSON object (see the module's docstring), without newline.

    Non-ASCII is written as `\\uXXXX`, so no character of a field can end the line."""
    line: dict[str, object] = {
        "time": record["time"].astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
        "level": record["level"].name,
        "message": record["message"],
        "logger": record["name"],
    }
    for key, value in record["extra"].items():
        if key not in _CORE_KEYS and key != _JSON_KEY:
            line[key] = value
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        line["exception"] = "".join(
            traceback.format_exception(exception.type, exception.value, exception.traceback)
        ).rstrip()
    return json.dumps(line, default=str)


_JSON_KEY = "_json_line"


def _json_format(record: Any) -> str:
    # loguru fills the template this returns from the record: the line is put in the
    # record and the template names it, so no brace of the line is read as a field.
    record["extra"][_JSON_KEY] = json_line(record)
    return "{extra[" + _JSON_KEY + "]}\n"


def configure_logging(settings: LoggerSettings) -> None:
    """Send every log line to stderr at `settings.level`, as text or JSON lines."""
    logger.remove()
    logger.configure(patcher=_patch)
    if settings.format == "json":
        logger.add(sys.stderr, level=settings.level, format=_json_format, colorize=False)
    else:
        logger.add(sys.stderr, level=settings.level, format=TEXT_FORMAT, colorize=None)
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
    grpc_logger = logging.getLogger(GRPC_LOGGER)
    if _reply_not_sent not in grpc_logger.filters:
        grpc_logger.addFilter(_reply_not_sent)


@dataclass
class _Repeats:
    level: str
    since: float  # when the last line of this kind was written
    count: int = 0  # occurrences since then, not written
    last: tuple[str, tuple[object, ...]] = ("", ())
    fields: dict[str, object] | None = None  # the last occurrence's structured fields


class ThrottledLog:
    """Log lines of a repeating kind: the first at once, then at most one per `interval`.

    An occurrence within `interval` of the kind's last written line is only counted; one
    line per interval then says how many there were, with the text of the last (`... (N
    times in the last 10 s)`). A kind quiet for a whole interval starts afresh: its next
    occurrence is written at once. `flush()` writes the counts that are due — the owner
    calls it at least once per interval — and `flush(everything=True)` all of them, at
    shutdown. Messages are formatted only when written; `fields` are bound to the record
    as structured fields (loguru's `extra`: keys of the JSON line), a summary's being the
    last occurrence's.
    """

    def __init__(
        self, interval: float = SUMMARY_INTERVAL_S, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._kinds: dict[str, _Repeats] = {}

    def log(
        self,
        level: str,
        kind: str,
        message: str,
        *args: object,
        fields: dict[str, object] | None = None,
    ) -> None:
        now = self._clock()
        repeats = self._kinds.get(kind)
        if repeats is None or (not repeats.count and now - repeats.since >= self.interval):
            self._kinds[kind] = _Repeats(level, now)
            bound = logger.bind(**fields) if fields else logger
            bound.opt(depth=1).log(level, message, *args)
            return
        repeats.count += 1
        repeats.last = (message, args)
        repeats.fields = fields
        if now - repeats.since >= self.interval:
            self._summarise(repeats, now)

    def flush(self, *, everything: bool = False) -> None:
        now = self._clock()
        for kind, repeats in list(self._kinds.items()):
            if repeats.count and (everything or now - repeats.since >= self.interval):
                self._summarise(repeats, now)
            elif not repeats.count and now - repeats.since >= self.interval:
                del self._kinds[kind]

    def _summarise(self, repeats: _Repeats, now: float) -> None:
        message, args = repeats.last
        times = f"{repeats.count} time{'s' if repeats.count > 1 else ''}"
        bound = logger.bind(**(repeats.fields or {}), repeats=repeats.count)
        bound.log(
            repeats.level,
            f"{message} ({times} in the last {round(now - repeats.since, 1):g} s)",
            *args,
        )
        repeats.since, repeats.count, repeats.last = now, 0, ("", ())
        repeats.fields = None
