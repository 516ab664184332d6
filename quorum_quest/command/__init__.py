"""`quorum-quest`: the service from the shell, through the SDK.

`lock` runs a command while holding a lock, `elect` campaigns and holds until
interrupted, `leader` and `watch` say who leads, `status` describes the service.
Errors are one line on stderr; exit statuses are in `_exit` (and `--help`,
docs/cli.md). Imports only the SDK and the standard library, never the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from quorum_quest.command import _elect, _lock, _query, _watch
from quorum_quest.command._exit import Exit, failure, say
from quorum_quest.command._interrupts import Interrupts
from quorum_quest.command._parser import parse

Handler = Callable[..., Awaitable[int]]

COMMANDS: dict[str, Handler] = {
    "lock": _lock.run,
    "elect": _elect.run,
    "leader": _query.leader,
    "watch": _watch.run,
    "status": _query.status,
}
# Commands whose normal end is an interrupt: they release what they hold and exit 0.
ENDED_BY_INTERRUPT = {"elect", "watch"}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return 130
    _show_sdk_warnings()
    interrupts = Interrupts()
    try:
        return asyncio.run(_run(COMMANDS[options.name], options, interrupts))
    except KeyboardInterrupt:  # before the handlers were in place
        return 130
    except BaseException as exc:
        inner = exc
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if isinstance(inner, SystemExit):
            raise
        if isinstance(inner, BrokenPipeError):  # `quorum-quest watch ... | head -1`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        known = failure(inner)
        if known is None:
            say(f"failed: {type(inner).__name__}: {inner}")
            return Exit.USAGE
        say(str(known))
        return known.code


async def _run(handler: Handler, options: object, interrupts: Interrupts) -> int:
    interrupts.install()
    try:
        return await handler(options, interrupts)
    except asyncio.CancelledError:
        signum = interrupts.received
        if signum is None:
            raise
        return Exit.OK if getattr(options, "name", "") in ENDED_BY_INTERRUPT else 128 + signum


def _show_sdk_warnings() -> None:
    """The SDK is silent unless asked: here its warnings (a retry while waiting, a
    release that failed) are worth a line on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("quorum-quest: %(message)s"))
    sdk = logging.getLogger("quorum_quest.client")
    sdk.addHandler(handler)
    sdk.setLevel(logging.WARNING)


__all__ = ["main"]
