"""The async Python SDK."""

from quorum_quest.client.client import Callbacks, LeaseSet, QuorumQuestClient
from quorum_quest.client.lease import Lease

__all__ = ["Callbacks", "Lease", "LeaseSet", "QuorumQuestClient"]
