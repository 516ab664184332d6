"""Stores register by name; the service and the config find them only through here.

Built-in stores and third-party ones alike are Python entry points in the group
`quorum_quest.stores` (`name = "package.module:StoreClass"`), loaded lazily so that
a backend's driver is imported only when that backend is configured. A built-in
backend whose driver is not installed names the extra that installs it
(`pip install quorum-quest[redis]`).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from quorum_quest.stores.base import LockStore

ENTRY_POINT_GROUP = "quorum_quest.stores"
ALIASES = {"scylla": "scylladb", "dynamo": "dynamodb"}

_registered: dict[str, type[LockStore]] = {}


class UnknownBackend(LookupError):
    """No store is registered under `name`, or its module cannot be imported."""

    def __init__(self, name: str, problem: str = "") -> None:
        message = problem or f"unknown backend {name!r}; available: {', '.join(available())}"
        super().__init__(message)
        self.name = name


def canonical_name(name: str) -> str:
    name = name.strip().lower()
    return ALIASES.get(name, name)


def register_store(name: str, store: type[LockStore]) -> None:
    """Register a store class under `name` (for stores not shipped as an entry point)."""
    _registered[canonical_name(name)] = store


def available() -> list[str]:
    return sorted(set(_registered) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def store_class(name: str) -> type[LockStore]:
    """The store class registered under `name` (or one of its aliases)."""
    name = canonical_name(name)
    if name in _registered:
        return _registered[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            store = ep.load()
        except ImportError as exc:
            raise UnknownBackend(name, _cannot_load(name, ep, exc)) from exc
        _registered[name] = store
        return store
    raise UnknownBackend(name)


def _cannot_load(name: str, ep: EntryPoint, exc: ImportError) -> str:
    """Why backend `name` cannot be loaded, in one line: for a package that is not
    installed, the extra of the backend's distribution that installs it."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing and not missing.startswith("quorum_quest.") and ep.dist is not None:
        extras = ep.dist.metadata.get_all("Provides-Extra") or []
        # A backend's extra is named after it; a backend without one (memory) needs
        # only the service's packages.
        extra = name if name in extras else "server" if "server" in extras else None
        if extra is not None:
            package = missing.partition(".")[0]
            return (
                f"backend {name!r} needs the {package!r} package, which is not installed:"
                f" install {ep.dist.name}[{extra}]"
            )
    return f"backend {name!r} cannot be loaded: {exc}"
