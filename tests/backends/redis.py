"""Redis for the tests.

`QQ_TEST_REDIS_URL` points the tests at a Redis you run yourself. Otherwise a
`redis-server` binary on PATH is started (the test command installs it from
Debian's packages), or, where a Docker engine runs, a testcontainers Redis. A
backend that cannot be started fails the run; it is never skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from quorum_quest.stores import store_class
from tests.backends import docker_engine_available, free_port

VARIANTS = [pytest.param("redis", marks=pytest.mark.redis)]

# For probes: one attempt, so that a dead or paused server is told apart quickly.
NO_RETRY = Retry(NoBackoff(), 0)


class RedisProcess:
    """A throw-away redis-server on 127.0.0.1 that keeps its port across restarts.

    Without `persistent` a restart comes back empty; with it every write is in an
    append-only file (fsync'd on each write), which the restarted server loads. `config`
    is written to a config file in its folder once and passed first (sentinels rewrite
    theirs, so a restart keeps what they learned).
    """

    START_TIMEOUT_S = 10.0

    def __init__(
        self, *extra_args: str, persistent: bool = False, config: str | None = None
    ) -> None:
        self.port = free_port()
        self.extra_args = extra_args
        self.persistent = persistent
        self.workdir = tempfile.mkdtemp(prefix="qq-redis-")
        self.config_file: Path | None = None
        if config is not None:
            self.config_file = Path(self.workdir) / "redis.conf"
            self.config_file.write_text(config)
        self.log = Path(self.workdir) / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (run the README's test command)")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        return [
            binary,
            *([str(self.config_file)] if self.config_file else []),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            *(persistence if self.persistent else ["--appendonly", "no"]),
            "--dir",
            self.workdir,
            "--logfile",
            str(self.log),
            *self.extra_args,
        ]

    def start(self) -> RedisProcess:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.answers():
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}\n{tail}")

    def answers(self) -> bool:
        """True when the server takes commands (a refusal such as NOAUTH counts; LOADING not)."""
        client = redis.Redis(
            port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=NO_RETRY
        )
        try:
            return bool(client.ping())
        except redis.BusyLoadingError:
            return False
        except (redis.AuthenticationError, redis.ResponseError):
            return True
        except redis.RedisError:
            return False
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL (a paused server too), and wait for it to be gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        """The same as `kill`: an abrupt outage."""
        self.kill()

    def restart(self) -> RedisProcess:
        """Kill if running, then start again on the same port with the same arguments."""
        self.kill()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers until `resume`."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
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


# Per-command timeout of the tests' stores: far above any reply, so that a loaded machine
# never turns a slow answer into a failure. Tests about timeouts set their own.
STORE_TIMEOUT_S = 30.0


@pytest.fixture
def redis_store_config(redis_url: str) -> dict[str, Any]:
    return {
        "url": redis_url,
        "key_prefix": f"test-{uuid.uuid4().hex[:12]}",
        "timeout": STORE_TIMEOUT_S,
    }


async def redis_prefix_in_use(redis_url: str) -> str:
    """A fresh key prefix on the test Redis whose state marker is already valid, as a
    Redis that other service instances use is: no state-loss grace period is due there."""
    prefix = f"in-use-{uuid.uuid4().hex[:8]}"
    settings = store_class("redis").settings_model.model_validate(
        {"url": redis_url, "key_prefix": prefix}
    )
    store = store_class("redis")(settings, grace_ms=0)
    await store.start()
    try:
        assert await store.check_state() == 0
    finally:
        await store.close()
    return prefix
