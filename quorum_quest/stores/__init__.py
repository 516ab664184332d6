"""Lock backends behind one protocol (`base`), found by name through `registry`."""

from quorum_quest.stores.base import (
    Acquisition,
    Holder,
    LockChange,
    LockKey,
    LockStore,
    Renewal,
    StoreSettings,
)
from quorum_quest.stores.registry import UnknownBackend, available, register_store, store_class

__all__ = [
    "Acquisition",
    "Holder",
    "LockChange",
    "LockKey",
    "LockStore",
    "Renewal",
    "StoreSettings",
    "UnknownBackend",
    "available",
    "register_store",
    "store_class",
]
