"""Quorum Quest: leases on named locks, served over gRPC.

The public client API is exactly what this module exports; everything else is
importable but internal.

The client's names load on first use: `import quorum_quest`, which the service, its
stores and tools do to reach a submodule, does not pay for grpc and protobuf (~0.2 s),
which only the client needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quorum_quest.errors import (
    AccessRefused,
    InvalidArgument,
    LeadershipLost,
    PermissionDenied,
    QuorumQuestError,
    QuotaExceeded,
    ServiceUnavailable,
    Unauthenticated,
)

if TYPE_CHECKING:
    from quorum_quest.client import (
        Callbacks,
        ClientTLS,
        LeaderChange,
        Lease,
        LeaseSet,
        QuorumQuestClient,
    )

__all__ = [
    "AccessRefused",
    "Callbacks",
    "ClientTLS",
    "InvalidArgument",
    "Lease",
    "LeaderChange",
    "LeaseSet",
    "LeadershipLost",
    "PermissionDenied",
    "QuorumQuestClient",
    "QuorumQuestError",
    "QuotaExceeded",
    "ServiceUnavailable",
    "Unauthenticated",
]
__version__ = "0.1.0"

_CLIENT_NAMES = frozenset(
    {"Callbacks", "ClientTLS", "Lease", "LeaderChange", "LeaseSet", "QuorumQuestClient"}
)

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all attribute

    def __getattr__(name: str) -> Any:
        if name in _CLIENT_NAMES:
            from quorum_quest import client

            value = getattr(client, name)
            globals()[name] = value
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(globals()) | _CLIENT_NAMES)
