"""Quorum Quest: leases on named locks, served over gRPC.

The public client API is exactly what this module exports; everything else is
importable but internal.
"""

from quorum_quest.client import Callbacks, Lease, LeaseSet, QuorumQuestClient
from quorum_quest.errors import (
    InvalidArgument,
    LeadershipLost,
    QuorumQuestError,
    ServiceUnavailable,
)

__all__ = [
    "Callbacks",
    "InvalidArgument",
    "Lease",
    "LeaseSet",
    "LeadershipLost",
    "QuorumQuestClient",
    "QuorumQuestError",
    "ServiceUnavailable",
]
__version__ = "0.1.0"
