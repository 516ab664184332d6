"""Every exception Quorum Quest raises, in one hierarchy.

A backend failure is always a `StoreUnavailable` (server side) or a
`ServiceUnavailable` (client side); it is never reported as "someone else leads".
"""

from __future__ import annotations

from collections.abc import Sequence


class QuorumQuestError(Exception):
    """Base class of every Quorum Quest error."""


class InvalidArgument(QuorumQuestError, ValueError):
    """A request or setting is malformed; `field` names what was wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class StoreUnavailable(QuorumQuestError):
    """The lock store could not be reached or failed; the outcome of the call is unknown."""

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"{backend} store unavailable: {detail}")
        self.backend = backend
        self.detail = detail


class StoreContended(StoreUnavailable):
    """The store gave up on a call whose conditional writes kept losing races for one lock.

    Unlike a plain `StoreUnavailable`, nothing is in doubt: the backend refused each
    attempt, so the call granted and refreshed nothing, and calling again is safe. Being a
    `StoreUnavailable`, it is handled wherever that is; gRPC's ABORTED says it best.
    """

    def __init__(self, backend: str, detail: str) -> None:
        QuorumQuestError.__init__(self, f"{backend} store contended: {detail}")
        self.backend = backend
        self.detail = detail


class ServiceUnavailable(QuorumQuestError):
    """The client got no usable answer from the service (transport, deadline or backend).

    `code` is the gRPC status code, when the service answered with one.
    """

    def __init__(self, message: str, code: object = None) -> None:
        super().__init__(message)
        self.code = code


class LeadershipLost(QuorumQuestError):
    """The lease could no longer be guaranteed, so the leadership body was cancelled."""


class ConfigError(QuorumQuestError):
    """A configuration value is missing or invalid; `path` is the dotted key path.

    One error may name several mistakes: `mistakes` holds each as `(path, reason)`, this
    one first, and the message has one line per mistake.
    """

    def __init__(self, path: str, reason: str, *, more: Sequence[tuple[str, str]] = ()) -> None:
        self.mistakes = ((path, reason), *more)
        super().__init__("\n".join(f"{p}: {r}" if p else r for p, r in self.mistakes))
        self.path = path
        self.reason = reason


class AccessRefused(QuorumQuestError):
    """A call the service refused for who made it; `identity` names the caller where known.

    The message never holds a credential.
    """

    def __init__(self, message: str, identity: str = "") -> None:
        super().__init__(message)
        self.identity = identity


class Unauthenticated(AccessRefused):
    """The caller's credentials are missing (where they are needed), unknown or unusable:
    answered UNAUTHENTICATED."""


class PermissionDenied(AccessRefused):
    """The caller's identity is known, and no rule lets it do this to this lock: answered
    PERMISSION_DENIED, naming the lock and the operation."""


class QuotaExceeded(AccessRefused):
    """The caller's identity is over one of its quotas (leases held, calls per second):
    answered RESOURCE_EXHAUSTED; nothing was changed."""
