"""The exit statuses of `quorum-quest`, and the one line an error prints.

`lock` exits with its command's own status, so quorum-quest's own outcomes sit in
120-127, which commands rarely use, beside `timeout(1)`'s 124-127 and with the same
meaning where they overlap (124: timed out; 126, 127: the command could not be run).
"""

from __future__ import annotations

import sys
from enum import IntEnum

import grpc

from quorum_quest.errors import (
    AccessRefused,
    InvalidArgument,
    LeadershipLost,
    QuorumQuestError,
    ServiceUnavailable,
)


class Exit(IntEnum):
    OK = 0
    NO_LEADER = 120  # `leader`: the lock is free
    LOST = 121  # the lease was lost; `lock` stopped its command
    UNAVAILABLE = 122  # no usable answer from the service
    REFUSED = 123  # unauthenticated, permission denied or over a quota
    NOT_ACQUIRED = 124  # the lock was not acquired within --wait
    USAGE = 125  # bad flags or arguments, or the service refused one as invalid
    CANNOT_EXECUTE = 126  # `lock`: the command was found but could not be run
    NOT_FOUND = 127  # `lock`: the command was not found


EXIT_CODES_HELP = """\
exit status:
  0        success (lock: the command's own status, 128+N when signal N ended it)
  120      leader: no one holds the lock
  121      lock, elect: the lease was lost (lock stopped the command)
  122      the service is unavailable (no answer, a deadline, its store down)
  123      refused: unauthenticated, permission denied or over a quota
  124      lock: the lock was not acquired within --wait
  125      usage error, or an argument the service refused as invalid
  126      lock: the command could not be executed
  127      lock: the command was not found
"""


class Failure(Exception):
    """Ends the command with `code`, printing `message` on one line of stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def failure(exc: BaseException) -> Failure | None:
    """The exit an SDK or gRPC error means, or None for an error that is not one of ours."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, LeadershipLost):
        return Failure(Exit.LOST, str(exc))
    if isinstance(exc, ServiceUnavailable):
        return Failure(Exit.UNAVAILABLE, f"service unavailable: {exc}")
    if isinstance(exc, AccessRefused):
        return Failure(Exit.REFUSED, f"refused: {exc}")
    if isinstance(exc, InvalidArgument):
        return Failure(Exit.USAGE, f"invalid argument: {exc}")
    if isinstance(exc, QuorumQuestError):
        return Failure(Exit.UNAVAILABLE, str(exc))
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        details = f"{code.name}: {exc.details() or code.name}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return Failure(Exit.USAGE, f"invalid argument: {details}")
        if code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ):
            return Failure(Exit.REFUSED, f"refused: {details}")
        return Failure(Exit.UNAVAILABLE, f"service unavailable: {details}")
    return None


def say(message: str) -> None:
    """One line on stderr, prefixed with the program's name."""
    print(f"quorum-quest: {message}", file=sys.stderr, flush=True)
