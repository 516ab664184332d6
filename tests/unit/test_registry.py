"""Stores are found by name, including third-party ones registered from outside."""

from __future__ import annotations

import pytest

from quorum_quest.stores import UnknownBackend, available, register_store, registry, store_class
from quorum_quest.stores.memory import MemoryStore


def test_builtin_stores_are_entry_points() -> None:
    assert {"memory", "redis"} <= set(available())
    assert store_class("memory") is MemoryStore
    assert store_class("redis").backend == "redis"


def test_unknown_backend_lists_the_available_ones() -> None:
    with pytest.raises(UnknownBackend, match="available: .*memory"):
        store_class("etcd")


def test_a_third_party_store_can_register(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_registered", {})

    class EtcdStore(MemoryStore):
        backend = "etcd"

    register_store("Etcd", EtcdStore)
    assert store_class("etcd") is EtcdStore
    assert "etcd" in available()


def test_the_service_and_config_import_no_concrete_store() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).parents[2] / "quorum_quest"
    for module in [*root.joinpath("server").glob("*.py"), *root.joinpath("config").glob("*.py")]:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in {
                    "quorum_quest.stores.memory",
                    "quorum_quest.stores.redis",
                }, module
