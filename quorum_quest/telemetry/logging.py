"""One log stream: loguru, with the standard `logging` records of libraries routed into it."""

from __future__ import annotations

import logging
import sys
from typing import Any

from loguru import logger
from opentelemetry import trace

from quorum_quest.config.settings import LoggerSettings


class _ToLoguru(logging.Handler):
    """Forward a standard `logging` record (grpc, redis, ...) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DDTHH:mm:ss.SSSZ}</green> <level>{level: <7}</level> "
    "<cyan>{name}</cyan> {message}"
)


def _trace_ids(record: Any) -> None:
    """Put the current span's ids on every record logged inside a span."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        record["extra"]["trace_id"] = format(context.trace_id, "032x")
        record["extra"]["span_id"] = format(context.span_id, "016x")


def configure_logging(settings: LoggerSettings) -> None:
    """Send every log line to stderr at `settings.level`, as text or JSON lines."""
    logger.remove()
    logger.configure(patcher=_trace_ids)
    if settings.format == "json":
        logger.add(sys.stderr, level=settings.level, serialize=True)
    else:
        logger.add(sys.stderr, level=settings.level, format=TEXT_FORMAT, colorize=None)
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
