"""The async Python SDK."""

from quorum_quest.client.client import QuorumQuestClient
from quorum_quest.client.connection import ClientTLS
from quorum_quest.client.leadership import Callbacks
from quorum_quest.client.lease import Lease
from quorum_quest.client.lease_set import LeaseSet
from quorum_quest.client.watch import LeaderChange

__all__ = ["Callbacks", "ClientTLS", "Lease", "LeaderChange", "LeaseSet", "QuorumQuestClient"]
