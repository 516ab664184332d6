# ruff: noqa: E402 - backend plugins are imported after registering them for assert rewriting
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.backends")

from quorum_quest.config.loader import validate
from quorum_quest.config.settings import Settings
from quorum_quest.server import LockServer, running_server
from quorum_quest.stores import LockStore, store_class
from tests.backends import plugin_modules

_PLUGINS = plugin_modules()
pytest_plugins = [module.__name__ for module in _PLUGINS]

# Every store variant the contract suite runs against: the embedded store, then
# whatever each backend plugin in tests/backends/ declares.
BACKENDS = ["memory", *(variant for module in _PLUGINS for variant in module.VARIANTS)]


@pytest.fixture(params=BACKENDS)
def store_variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def backend(store_variant: str) -> str:
    """The backend type of the variant under test (`dynamodb-moto` -> `dynamodb`)."""
    return store_variant.split("-")[0]


@pytest.fixture
def store_config(store_variant: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `store:` section for the variant under test, isolated from every other test."""
    if store_variant == "memory":
        return {}
    return request.getfixturevalue(f"{store_variant.replace('-', '_')}_store_config")


def make_settings(backend: str, store: dict[str, Any], **overrides: Any) -> Settings:
    raw: dict[str, Any] = {
        "serverAddress": "127.0.0.1:0",
        "backend": {"type": backend},
        "store": store,
        # No state-loss grace period unless a test asks for one: every test starts
        # its store fresh, and a grace period would refuse its first grants.
        "server": {"healthInterval": 0.2, "shutdownGrace": 1, "stateLossGrace": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return validate(raw)


@pytest.fixture
async def store(backend: str, store_config: dict[str, Any]) -> AsyncIterator[LockStore]:
    settings = make_settings(backend, store_config)
    instance = store_class(backend)(settings.store_settings())
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
async def server(backend: str, store_config: dict[str, Any]) -> AsyncIterator[LockServer]:
    async with running_server(make_settings(backend, store_config)) as lock_server:
        yield lock_server


@pytest.fixture
def address(server: LockServer) -> str:
    return f"127.0.0.1:{server.port}"
