from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from quorum_quest.config.loader import validate
from quorum_quest.config.settings import Settings
from quorum_quest.server import LockServer, running_server
from quorum_quest.stores import LockStore, store_class
from tests.backends import redis_server

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    try:
        with redis_server() as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(f"Redis is required and could not be started: {exc}", pytrace=False)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_config(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `store:` section for `backend`, isolated from every other test."""
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        return {"url": url, "key_prefix": f"test-{uuid.uuid4().hex[:12]}"}
    return {}


def make_settings(backend: str, store: dict[str, Any], **overrides: Any) -> Settings:
    raw: dict[str, Any] = {
        "serverAddress": "127.0.0.1:0",
        "backend": {"type": backend},
        "store": store,
        "server": {"healthInterval": 0.2, "shutdownGrace": 1},
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
