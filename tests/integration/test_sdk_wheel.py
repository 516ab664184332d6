"""`pip install quorum-quest` as an SDK user gets it: the built wheel, installed with no
extras into a fresh virtual environment, is the typed client alone, and a typed user
program runs on it against a real service (run from the development environment).

The wheel's dependencies come from the registry through uv's cache, as a user's would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.backends import DIE_WITH_PARENT, free_port

ROOT = Path(__file__).parents[2]
USER_PROGRAM = ROOT / "tests" / "fixtures" / "sdk_user" / "program.py"

MAX_INSTALLED_BYTES = 25 * 1024 * 1024

# What only the extras bring: none of it may be installed or imported by the SDK alone.
SERVER_DISTRIBUTIONS = {
    "acsylla",
    "aioboto3",
    "botocore",
    "cryptography",
    "grpcio-health-checking",
    "grpcio-reflection",
    "hiredis",
    "loguru",
    "opentelemetry-api",
    "opentelemetry-instrumentation-grpc",
    "opentelemetry-sdk",
    "prometheus-client",
    "pydantic",
    "pydantic-settings",
    "pyyaml",
    "redis",
    "uvloop",
    "watchfiles",
}
SERVER_MODULES = (
    "quorum_quest.cli",
    "quorum_quest.config",
    "quorum_quest.server",
    "quorum_quest.stores",
    "quorum_quest.telemetry",
    "acsylla",
    "aioboto3",
    "cryptography",
    "loguru",
    "opentelemetry",
    "prometheus_client",
    "pydantic",
    "redis",
    "uvloop",
    "watchfiles",
    "yaml",
)


@dataclass(frozen=True)
class SdkVenv:
    python: Path
    bin: Path
    site_packages: Path
    env: dict[str, str]  # no QUORUMQUEST_* and no virtualenv of the test run


def run(
    *command: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`command`, run to its end as a process that dies with the test run."""
    return subprocess.run(
        [*DIE_WITH_PARENT, *map(str, command)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def uv() -> list[str]:
    """uv as ./scripts/test provides it: on PATH, or installed for python3 from PyPI."""
    found = shutil.which("uv")
    return [found] if found else ["python3", "-m", "uv"]


def clean_env() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("QUORUMQUEST_")
        and name not in {"VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT"}
    }


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> SdkVenv:
    """A fresh virtual environment holding the wheel built from this tree, no extras."""
    work = tmp_path_factory.mktemp("sdk-wheel")
    env = clean_env()
    built = run(*uv(), "build", "--wheel", "--out-dir", work / "dist", ROOT, cwd=work, env=env)
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("quorum_quest-*.whl")
    venv = work / "venv"
    made = run(*uv(), "venv", "--python", sys.executable, venv, cwd=work, env=env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = run(*uv(), "pip", "install", "--python", python, wheel, cwd=work, env=env)
    assert installed.returncode == 0, installed.stderr
    site = run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=work, env=env
    )
    return SdkVenv(python, venv / "bin", Path(site.stdout.strip()), env)


def test_the_sdk_alone_is_small_and_brings_nothing_of_the_service(
    sdk: SdkVenv, tmp_path: Path
) -> None:
    size = sum(
        (Path(folder) / name).lstat().st_size
        for folder, _, names in os.walk(sdk.site_packages)
        for name in names
    )
    listed = run(
        sdk.python,
        "-c",
        "import importlib.metadata as m, json;"
        " print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))",
        cwd=tmp_path,
        env=sdk.env,
    )
    distributions = set(json.loads(listed.stdout))

    assert "quorum-quest" in distributions
    assert not distributions & SERVER_DISTRIBUTIONS
    assert size <= MAX_INSTALLED_BYTES, f"{size / 2**20:.1f} MiB installed: {sorted(distributions)}"
    assert (sdk.site_packages / "quorum_quest" / "py.typed").is_file()


def test_importing_the_sdk_loads_nothing_of_the_service(sdk: SdkVenv, tmp_path: Path) -> None:
    program = (
        "import json, sys\n"
        "import quorum_quest\n"
        "bare = sorted(sys.modules)\n"
        "from quorum_quest import Lease, LeadershipLost, QuorumQuestClient\n"
        "client = sorted(sys.modules)\n"
        "import quorum_quest.command, quorum_quest.sync\n"
        "print(json.dumps({'bare': bare, 'client': client, 'all': sorted(sys.modules)}))\n"
    )
    result = run(sdk.python, "-c", program, cwd=tmp_path, env=sdk.env)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)

    for modules in loaded.values():
        assert not [m for m in modules if m.partition(".")[0] in SERVER_MODULES]
        assert not [m for m in modules if ".".join(m.split(".")[:2]) in SERVER_MODULES]
    # The client's names load on first use: a bare import pays for no grpc.
    assert "grpc" not in loaded["bare"] and "grpc" in loaded["client"]


def test_the_quorum_quest_command_runs_on_the_sdk_alone(sdk: SdkVenv, tmp_path: Path) -> None:
    result = run(sdk.bin / "quorum-quest", "--help", cwd=tmp_path, env=sdk.env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: quorum-quest")


def test_the_service_without_its_extra_names_it_in_one_line(sdk: SdkVenv, tmp_path: Path) -> None:
    result = run(sdk.bin / "quorum-quest-service", cwd=tmp_path, env=sdk.env, timeout=60)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith("install quorum-quest[server]")


@pytest.fixture
def service_address(tmp_path: Path) -> Iterator[str]:
    """A `quorum-quest-service` process of the development environment, memory store."""
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "config.yaml"
    config.write_text(f'serverAddress: "{address}"\nserver: {{stateLossGrace: 0}}\n')
    process = subprocess.Popen(
        [*DIE_WITH_PARENT, "-m", "quorum_quest.cli", "--config", str(config)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(address, process)
        yield address
    finally:
        process.kill()
        process.communicate()


def wait_serving(address: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"service exited early: {process.communicate()[1]}")
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError("service did not start serving")


def user_program(folder: Path) -> Path:
    """The user program, copied out of this tree: neither mypy nor Python may find the
    package's sources next to it instead of the installed wheel."""
    return Path(shutil.copy(USER_PROGRAM, folder))


def test_a_typed_user_program_passes_mypy_strict_on_the_installed_wheel(
    sdk: SdkVenv, tmp_path: Path
) -> None:
    program = user_program(tmp_path)
    checked = run(
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--python-executable",
        sdk.python,
        "--cache-dir",
        tmp_path / "mypy-cache",
        program,
        cwd=tmp_path,
        env=sdk.env,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_user_program_on_the_sdk_alone_acquires_and_releases_a_lease(
    sdk: SdkVenv, service_address: str, tmp_path: Path
) -> None:
    program = user_program(tmp_path)
    result = run(sdk.python, program, service_address, cwd=tmp_path, env=sdk.env, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)

    assert seen["acquired"] is True
    assert isinstance(seen["token"], int) and seen["token"] > 0
    assert seen["leader"] == [seen["client_id"], seen["token"]]
    assert seen["released"] is True
    assert seen["leader_after_release"] is None
    assert "leadership_error" not in seen
    assert seen["leadership_token"] > seen["token"]
    assert seen["leader_after_leadership"] is None
