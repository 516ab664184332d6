"""DynamoDB for the tests: moto in server mode and dynalite, two independent implementations.

Each runs as its own process on a free 127.0.0.1 port, started once per session when a
test first needs it and stopped at the end: moto's server (`moto_server`'s entry point
from this venv, run single-threaded, see `moto_process`), and `dynalite` from the cache
dir that `scripts/setup/dynalite.sh` installs it into (or `QQ_DYNALITE_BIN`).
`QQ_TEST_DYNAMODB_ENDPOINT` replaces both in the store variants with one endpoint you run
yourself (DynamoDB itself, DynamoDB Local in a container, ...), reached with the AWS
default credential chain and `AWS_REGION` (default us-east-1); the tests of emulator
quirks still start the emulators. An implementation that cannot be started fails the
run; it is never skipped.

Every test gets a fresh table of its own, created by the store (`create_table`) and
deleted after the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.backends import free_port

ENDPOINT_ENV = "QQ_TEST_DYNAMODB_ENDPOINT"
DYNALITE_VERSION = "4.0.0"  # keep equal to scripts/setup/dynalite.sh
TEST_CREDENTIALS = {"accessKeyId": "qq-test", "secretAccessKey": "qq-test-secret"}
REGION = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
# The store's TTL judgement on one machine needs no skew allowance; a small one keeps
# the margin in the code path without slowing the expiry tests.
CONTRACT_CLOCK_SKEW_MARGIN = 0.05
# Seconds a store call may take, retries included. The store's default (2 s) is for
# production; on a loaded 2-core machine an emulator can take longer to answer (moto
# serves one request at a time, so a batch queues behind itself), and no test may depend
# on speed. Tests about deadlines set their own.
CONTRACT_TIMEOUT_S = 30.0

IMPLEMENTATIONS = ("endpoint",) if os.environ.get(ENDPOINT_ENV) else ("moto", "dynalite")
VARIANTS = [
    pytest.param(f"dynamodb-{name}", marks=pytest.mark.dynamodb) for name in IMPLEMENTATIONS
]


@dataclass(frozen=True)
class Endpoint:
    """A running DynamoDB implementation: `name` is moto, dynalite or endpoint."""

    name: str
    url: str

    def store_config(self, **overrides: Any) -> dict[str, Any]:
        """A `store:` section for a fresh table of its own on this endpoint."""
        config: dict[str, Any] = {
            "region": REGION,
            "table": f"qq-test-{uuid.uuid4().hex[:12]}",
            "endpoints": [self.url],
            "clock_skew_margin": CONTRACT_CLOCK_SKEW_MARGIN,
            "timeout": CONTRACT_TIMEOUT_S,
        }
        if self.name != "endpoint":
            config.update(TEST_CREDENTIALS)
        return config | overrides

    def admin(self) -> Any:
        """A plain boto3 client for looking behind the store (scans, deletes)."""
        credentials = {}
        if self.name != "endpoint":
            credentials = {
                "aws_access_key_id": TEST_CREDENTIALS["accessKeyId"],
                "aws_secret_access_key": TEST_CREDENTIALS["secretAccessKey"],
            }
        return boto3.client(
            "dynamodb",
            endpoint_url=self.url,
            region_name=REGION,
            config=Config(connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 3}),
            **credentials,
        )

    def delete_table(self, table: str) -> None:
        try:
            self.admin().delete_table(TableName=table)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise


def moto_server_binary() -> str:
    beside_python = Path(sys.executable).with_name("moto_server")
    if beside_python.exists():
        return str(beside_python)
    if found := shutil.which("moto_server"):
        return found
    raise RuntimeError("moto_server is not installed (uv sync installs the dev group's moto)")


def dynalite_binary() -> str:
    """Where scripts/setup/dynalite.sh put dynalite (same path logic), or QQ_DYNALITE_BIN."""
    if configured := os.environ.get("QQ_DYNALITE_BIN"):
        return configured
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    installed = cache / "quorum-quest" / f"dynalite-{DYNALITE_VERSION}" / "node_modules" / ".bin"
    if (installed / "dynalite").exists():
        return str(installed / "dynalite")
    if found := shutil.which("dynalite"):
        return found
    raise RuntimeError("dynalite is not installed: run ./scripts/test (scripts/setup/dynalite.sh)")


class EmulatorProcess:
    """One DynamoDB implementation as a child process on 127.0.0.1, ready when it answers."""

    START_TIMEOUT_S = 30.0

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str]) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.env = env
        self.workdir = Path(tempfile.mkdtemp(prefix=f"qq-{name}-"))
        self.log = self.workdir / "output.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, f"http://127.0.0.1:{self.port}")

    def start(self) -> EmulatorProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=os.environ | self.env,
            )
        admin = self.endpoint.admin()
        deadline = time.monotonic() + self.START_TIMEOUT_S
        problem = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                problem = f"exited with status {self.process.returncode}"
                break
            try:
                admin.list_tables(Limit=1)
                return self
            except ClientError:
                return self  # it answers, if only to refuse these credentials
            except BotoCoreError as exc:
                problem = str(exc)
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.name} did not start on port {self.port}: {problem}\n{self.output()}"
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> EmulatorProcess:
        """Kill if running, then start again on the same port: in memory, its tables are gone."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


# moto_server's own entry point, serving one request at a time: moto does not make a
# conditional write atomic, so its threaded server can grant one lock twice (see
# test_quirk_threaded_moto_server_can_grant_a_lock_twice).
_SERIAL_MOTO_SERVER = """
import sys
import moto.server
from werkzeug.serving import run_simple

def run_serially(*args, **kwargs):
    return run_simple(*args, **(kwargs | {"threaded": False}))

moto.server.run_simple = run_serially
moto.server.main(sys.argv[1:])
"""


def moto_process(*, threaded: bool = False, **env: str) -> EmulatorProcess:
    """moto in server mode, serialised unless `threaded` (then the plain `moto_server`).

    `INITIAL_NO_AUTH_ACTION_COUNT="0"` in `env` makes it check credentials.
    """
    port = free_port()
    binary = moto_server_binary()  # fails early with a clear message where moto is missing
    launch = [binary] if threaded else [sys.executable, "-c", _SERIAL_MOTO_SERVER]
    return EmulatorProcess("moto", [*launch, "-H", "127.0.0.1", "-p", str(port)], port, env)


def dynalite_process() -> EmulatorProcess:
    port = free_port()
    # Tables stay CREATING for 50 ms instead of 500: the store's wait is still exercised.
    command = [
        dynalite_binary(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--createTableMs",
        "50",
    ]
    return EmulatorProcess("dynalite", command, port, {})


def _session_endpoint(make_process: Callable[[], EmulatorProcess], name: str) -> Iterator[Endpoint]:
    try:
        process = make_process()
    except RuntimeError as exc:
        pytest.fail(f"{name} is required and could not be started: {exc}", pytrace=False)
    try:
        process.start()
    except (RuntimeError, OSError) as exc:
        process.__exit__()
        pytest.fail(f"{name} is required and could not be started: {exc}", pytrace=False)
    try:
        yield process.endpoint
    finally:
        process.__exit__()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[Endpoint]:
    yield from _session_endpoint(moto_process, "moto")


@pytest.fixture(scope="session")
def dynalite_endpoint() -> Iterator[Endpoint]:
    yield from _session_endpoint(dynalite_process, "dynalite")


@pytest.fixture(scope="session")
def other_endpoint() -> Endpoint:
    url = os.environ.get(ENDPOINT_ENV, "")
    try:
        Endpoint("endpoint", url).admin().list_tables(Limit=1)
    except (BotoCoreError, ClientError) as exc:
        pytest.fail(f"{ENDPOINT_ENV}={url} does not answer: {exc}", pytrace=False)
    return Endpoint("endpoint", url)


@pytest.fixture(params=IMPLEMENTATIONS)
def dynamodb_endpoint(request: pytest.FixtureRequest) -> Endpoint:
    """Each DynamoDB implementation in turn, for the DynamoDB store's own tests."""
    fixture = {"moto": "moto_endpoint", "dynalite": "dynalite_endpoint"}.get(
        request.param, "other_endpoint"
    )
    return request.getfixturevalue(fixture)


def _fresh_table(endpoint: Endpoint) -> Iterator[dict[str, Any]]:
    config = endpoint.store_config()
    yield config
    endpoint.delete_table(config["table"])


@pytest.fixture
def dynamodb_moto_store_config(moto_endpoint: Endpoint) -> Iterator[dict[str, Any]]:
    yield from _fresh_table(moto_endpoint)


@pytest.fixture
def dynamodb_dynalite_store_config(dynalite_endpoint: Endpoint) -> Iterator[dict[str, Any]]:
    yield from _fresh_table(dynalite_endpoint)


@pytest.fixture
def dynamodb_endpoint_store_config(other_endpoint: Endpoint) -> Iterator[dict[str, Any]]:
    yield from _fresh_table(other_endpoint)
