"""A grpc status, as the SDK raises it: the same exception for a unary call's status
and for a session operation's; and which of those a call that must not fail its caller
logs instead."""

from __future__ import annotations

import grpc

from quorum_quest.errors import (
    AccessRefused,
    InvalidArgument,
    PermissionDenied,
    QuotaExceeded,
    ServiceUnavailable,
    Unauthenticated,
)

# Refusals for who the caller is: an answer, not an outage, so never retried as one
# (a call-rate quota excepted, which `leadership()` and the keep-alive wait out).
ACCESS_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceeded,
}
# What a call that must not fail its caller (a release on the way out) logs instead.
BEST_EFFORT_FAILURES = (ServiceUnavailable, InvalidArgument, AccessRefused)


def status_error(code: grpc.StatusCode, details: str) -> Exception:
    """The exception for a call that ended with `code` and `details`."""
    details = details or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, reason = details.partition(": ")
        return InvalidArgument(field, reason) if reason else InvalidArgument("request", details)
    refusal = ACCESS_REFUSALS.get(code)
    if refusal is not None:
        return refusal(f"{code.name}: {details}")
    return ServiceUnavailable(f"{code.name}: {details}", code=code)


def rpc_error(exc: grpc.aio.AioRpcError) -> Exception:
    """The exception for a failed grpc call."""
    return status_error(exc.code(), exc.details() or "")
