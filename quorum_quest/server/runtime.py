"""What every call reads: the current settings, lease policy and store, as one snapshot."""

from __future__ import annotations

from dataclasses import dataclass

from quorum_quest.config.settings import Settings
from quorum_quest.stores import LockStore, store_class


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    """Lease lengths the service grants: `default` when the caller names none, never above `max`."""

    default_ttl_ms: int
    max_ttl_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> LeasePolicy:
        return cls(
            default_ttl_ms=int(settings.store_settings().ttl * 1000),
            max_ttl_ms=int(settings.server.maxTtl * 1000),
        )


def create_store(settings: Settings) -> LockStore:
    """A new, not yet started store for the configured backend."""
    return store_class(settings.backend.type)(settings.store_settings())


class Runtime:
    """The server's current configuration and store.

    Handlers read `policy` and `store` once per call, so a call never mixes two
    configurations.
    """

    def __init__(self, settings: Settings, store: LockStore) -> None:
        self.settings = settings
        self.policy = LeasePolicy.from_settings(settings)
        self.store = store
