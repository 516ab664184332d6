"""The blocking facade: `quorum_quest.sync.lock(...)` and `quorum_quest.sync.Lock`, for
scripts and programs without an event loop (see `quorum_quest.client.sync`)."""

from quorum_quest.client.sync import Lock, lock

__all__ = ["Lock", "lock"]
