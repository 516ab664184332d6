"""Redis for the tests.

`QQ_TEST_REDIS_URL` points the tests at a Redis you run yourself. Otherwise a
`redis-server` binary on PATH is started (the test command installs it from
Debian's packages), or, where a Docker engine runs, a testcontainers Redis. A
backend that cannot be started fails the run; it is never skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from tests.backends import docker_engine_available, free_port

VARIANTS = [pytest.param("redis", marks=pytest.mark.redis)]


class RedisProcess:
    """A throw-away redis-server on 127.0.0.1 with no persistence."""

    def __init__(self, *extra_args: str) -> None:
        self.port = free_port()
        self.extra_args = extra_args
        self.workdir = tempfile.mkdtemp(prefix="qq-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (run the README's test command)")
        self.process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def redis_server() -> Iterator[str]:
    """The URL of a real Redis for the whole test session."""
    if url := os.environ.get("QQ_TEST_REDIS_URL"):
        redis.Redis.from_url(url).ping()
        yield url
    elif shutil.which("redis-server") is not None:
        with RedisProcess() as server:
            yield server.url
    elif docker_engine_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer() as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
    else:
        raise RuntimeError(
            "no Redis for the tests: set QQ_TEST_REDIS_URL, install redis-server, or run Docker"
        )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    try:
        with redis_server() as url:
            yield url
    except (RuntimeError, OSError, redis.RedisError) as exc:
        pytest.fail(f"Redis is required and could not be started: {exc}", pytrace=False)


@pytest.fixture
def redis_store_config(redis_url: str) -> dict[str, Any]:
    return {"url": redis_url, "key_prefix": f"test-{uuid.uuid4().hex[:12]}"}
