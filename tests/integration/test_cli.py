"""`quorum-quest-service` as a user runs it: config paths, errors, signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quorum_quest._env import CLIENT_VARIABLES
from tests.backends import DIE_WITH_PARENT, free_port


def service(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*DIE_WITH_PARENT, "-m", "quorum_quest.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_serving(port: int, process: subprocess.Popen[str], target: str = "") -> None:
    deadline = time.monotonic() + 60  # a bound for a loaded machine, not a measurement
    with grpc.insecure_channel(target or f"127.0.0.1:{port}") as channel:
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


def serve_then_stop(process: subprocess.Popen[str], port: int, signum: int) -> str:
    """Wait until `process` serves on `port`, send `signum`, and return its stderr."""
    try:
        wait_serving(port, process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
    return stderr


@pytest.mark.parametrize("style", ["-config={}", "--config={}", "--config {}"])
def test_serves_with_go_or_gnu_style_config_flag_and_exits_0_on_sigterm(
    tmp_path: Path, style: str
) -> None:
    port = free_port()
    config = tmp_path / "conf.yaml"
    config.write_text(
        f'serverAddress: "127.0.0.1:{port}"\nlogger: {{level: LOG_LEVELS_DEBUGLEVEL}}\n'
    )
    process = service(*style.format(config).split(" "), cwd=tmp_path)
    stderr = serve_then_stop(process, port, signal.SIGTERM)
    assert process.returncode == 0, stderr
    assert f"config loaded from {config}" in stderr
    assert "stopped" in stderr


def test_directory_config_and_environment_override(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text('serverAddress: "127.0.0.1:1"\n')
    process = service(cwd=tmp_path, env={"QUORUMQUEST_SERVERADDRESS": f"127.0.0.1:{port}"})
    stderr = serve_then_stop(process, port, signal.SIGINT)
    assert process.returncode == 0, stderr


def test_without_a_config_file_it_says_it_uses_the_memory_store(tmp_path: Path) -> None:
    port = free_port()
    process = service(cwd=tmp_path, env={"QUORUMQUEST_SERVERADDRESS": f"127.0.0.1:{port}"})
    stderr = serve_then_stop(process, port, signal.SIGTERM)
    assert process.returncode == 0, stderr
    assert "using the embedded memory store" in stderr
    assert "with the memory store" in stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backend: {type: redis}\nstore: {port: nine}\n", "store.port"),
        ("serverAdress: x\n", "serverAdress: unknown key"),
        ("backend: [\n", "not valid YAML"),
    ],
)
def test_bad_config_exits_2_naming_the_key_without_traceback(
    tmp_path: Path, text: str, expected: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    process = service(f"-config={config}", cwd=tmp_path)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 2
    assert expected in stderr
    assert "Traceback" not in stderr


# A line of the service's log: `2026-01-02T03:04:05.678+00:00 LEVEL   logger message`.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d (\w+) +\S+ (.*)")


def start_up_error(process: subprocess.Popen[str]) -> str:
    """The message of the one ERROR line a service that cannot start writes; fails unless
    it exits 1 and every other line of its stderr is an INFO record (no traceback, no
    line of grpc's core log)."""
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr[-3000:]
    records = [LOG_LINE.fullmatch(line) for line in stderr.strip().splitlines()]
    assert all(records), stderr[-3000:]
    errors = [record[2] for record in records if record and record[1] != "INFO"]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def test_unreachable_store_exits_1_with_one_line_naming_it_once(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f'serverAddress: "127.0.0.1:{free_port()}"\nbackend: {{type: redis}}\n'
        f"store: {{host: 127.0.0.1, port: {port}, timeout: 0.5}}\n"
    )
    error = start_up_error(service(f"-config={config}", cwd=tmp_path))
    assert error.startswith(f"cannot start: redis store unavailable: 127.0.0.1:{port}/0: ")
    assert error.count(str(port)) == 1


@pytest.mark.parametrize("address", ["127.0.0.1:{}", ":{}", "localhost:{}"])
def test_an_address_in_use_exits_1_with_one_line_naming_it(tmp_path: Path, address: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0" if address.startswith(":") else "127.0.0.1", 0))
        taken.listen()
        address = address.format(taken.getsockname()[1])
        environ = {"QUORUMQUEST_SERVERADDRESS": address}
        error = start_up_error(service(cwd=tmp_path, env=environ))
    assert error == (
        f"cannot start: serverAddress {address}: address already in use"
        " (another process listens on it)"
    )


def test_runs_on_uvloop_by_default_and_asyncio_when_switched_off(tmp_path: Path) -> None:
    for setting, loop in (("", "uvloop"), ("server: {uvloop: false}\n", "asyncio")):
        port = free_port()
        config = tmp_path / "config.yaml"
        config.write_text(f'serverAddress: "127.0.0.1:{port}"\n{setting}')
        stderr = serve_then_stop(service(f"-config={config}", cwd=tmp_path), port, signal.SIGTERM)
        assert f"event loop: {loop}" in stderr


@pytest.mark.redis
def test_workers_share_one_port_and_stop_together(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f'serverAddress: "127.0.0.1:{port}"\nbackend: {{type: redis}}\n'
        f'store: {{url: "{redis_url}"}}\nserver: {{workers: 2}}\n'
    )
    process = service(f"-config={config}", cwd=tmp_path)
    try:
        wait_serving(port, process)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 2
        # Many connections: the kernel spreads them over both workers, and each one serves.
        for _ in range(10):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "started 2 workers" in stderr
    assert all(not Path(f"/proc/{child}").exists() for child in children)


def test_an_address_in_use_stops_workers_before_they_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = tmp_path / "config.yaml"
        config.write_text(
            f'serverAddress: "{address}"\nbackend: {{type: redis}}\n'
            f"store: {{host: 127.0.0.1, port: {free_port()}}}\nserver: {{workers: 2}}\n"
        )
        error = start_up_error(service(f"-config={config}", cwd=tmp_path))
    assert error.startswith(f"cannot start: serverAddress {address}: address already in use")


def test_every_config_mistake_is_a_line_naming_its_key(tmp_path: Path) -> None:
    """A typo'd key next to a wrong type: both named at once, one line each."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "serverAdress: x\nserver: {maxTtl: nine}\nbackend: {type: redis}\nstore: {hots: x}\n"
    )
    process = service(f"-config={config}", cwd=tmp_path)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert all(line.startswith("quorum-quest-service: config error: ") for line in lines), stderr
    keys = sorted(line.split(": ")[2] for line in lines)
    assert keys == ["server.maxTtl", "serverAdress", "store.hots"]


def test_the_clients_variables_in_the_environment_do_not_stop_the_service(
    tmp_path: Path,
) -> None:
    port = free_port()
    environ = dict.fromkeys(CLIENT_VARIABLES, "x")
    environ["QUORUMQUEST_SERVERADDRESS"] = f"127.0.0.1:{port}"
    process = service(cwd=tmp_path, env=environ)
    stderr = serve_then_stop(process, port, signal.SIGTERM)
    assert process.returncode == 0, stderr
    environ["QUORUMQUEST_TLS_CAFILE"] = "x"  # a near miss is still an unknown key
    line = config_error_line(service(cwd=tmp_path, env=environ))
    assert line.endswith("QUORUMQUEST_TLS_CAFILE: environment variable names no known key")


def test_workers_are_refused_for_the_memory_store(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text('serverAddress: "127.0.0.1:5999"\nserver: {workers: 2}\n')
    process = service(f"-config={config}", cwd=tmp_path)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 2
    assert "server.workers: the memory store keeps its locks inside one process" in stderr


@pytest.mark.redis
def test_a_dead_worker_stops_the_others_and_exits_1(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f'serverAddress: "127.0.0.1:{port}"\nbackend: {{type: redis}}\n'
        f'store: {{url: "{redis_url}"}}\nserver: {{workers: 2, shutdownGrace: 1}}\n'
    )
    process = service(f"-config={config}", cwd=tmp_path)
    try:
        wait_serving(port, process)
        first, second = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.kill(int(first), signal.SIGKILL)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1
    assert f"worker pid {first} exited with -9; stopping the others" in stderr
    assert not Path(f"/proc/{second}").exists()


def config_error_line(process: subprocess.Popen[str]) -> str:
    """The one line a config error prints; fails if `process` does not exit 2 with it."""
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(
            f"the service kept running instead of exiting 2:\n{stderr[-2000:]}"
        ) from None
    assert process.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("quorum-quest-service: config error: ")
    return lines[0]


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:70000", "127.0.0.1:-1", "::1"])
def test_an_address_without_a_valid_port_exits_2_naming_server_address(
    tmp_path: Path, address: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f'serverAddress: "{address}"\n')
    line = config_error_line(service(f"-config={config}", cwd=tmp_path))
    assert "config error: serverAddress: " in line


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(("address", "dial"), [(":{}", "127.0.0.1:{}"), ("[::1]:{}", "[::1]:{}")])
def test_all_interfaces_and_ipv6_addresses_serve(tmp_path: Path, address: str, dial: str) -> None:
    if address.startswith("[") and not ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f'serverAddress: "{address.format(port)}"\n')
    process = service(f"-config={config}", cwd=tmp_path)
    try:
        wait_serving(port, process, dial.format(port))
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, stderr


@pytest.mark.parametrize(
    ("content", "environ", "expected"),
    [
        (b"server: {maxTtl: .inf}\n", {}, "server.maxTtl: "),
        (b"server: {maxTtl: .nan}\n", {}, "server.maxTtl: "),
        (b"", {"QUORUMQUEST_SERVER_MAXTTL": "1e400"}, "server.maxTtl: "),
        (b"server: {maxTtl: 1e300}\n", {}, "server.maxTtl: "),
        (b"server: {healthInterval: 1e300}\n", {}, "server.healthInterval: "),
        (b'logger: {level: "\xff\xfe"}\n', {}, "config.yaml is not UTF-8 text"),
        (bytes(range(256)) * 16, {}, "config.yaml is not UTF-8 text"),
        (b"\x00\x01\x02\x03" * 64, {}, "config.yaml is not a text file"),
        (b"[" * 100_000, {}, "config.yaml nests too deeply"),
        (b"a:\n" + b"".join(b" " * i + b"b:\n" for i in range(1, 3000)), {}, "nests too deeply"),
    ],
    ids=[
        "inf",
        "nan",
        "env-1e400",
        "1e300",
        "interval-1e300",
        "non-utf8",
        "binary",
        "nul-bytes",
        "deep-flow",
        "deep-block",
    ],
)
def test_an_unreadable_or_out_of_range_config_exits_2_with_one_line(
    tmp_path: Path, content: bytes, environ: dict[str, str], expected: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(content)
    environ = {"QUORUMQUEST_SERVERADDRESS": f"127.0.0.1:{free_port()}", **environ}
    line = config_error_line(service(f"-config={config}", cwd=tmp_path, env=environ))
    assert expected in line


def test_a_list_variable_that_is_not_json_exits_2_naming_the_variable(tmp_path: Path) -> None:
    environ = {
        "QUORUMQUEST_SERVERADDRESS": f"127.0.0.1:{free_port()}",
        "QUORUMQUEST_BACKEND_TYPE": "scylladb",
        "QUORUMQUEST_STORE_ENDPOINTS": "[bad json",
        "QUORUMQUEST_STORE_CONNECT_TIMEOUT": "0.5",
    }
    line = config_error_line(service(cwd=tmp_path, env=environ))
    assert "config error: QUORUMQUEST_STORE_ENDPOINTS: " in line
    assert "JSON" in line


def test_an_invalid_section_is_reported_even_when_the_environment_sets_one_of_its_keys(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server: [maxTtl, 30]\n")
    environ = {
        "QUORUMQUEST_SERVERADDRESS": f"127.0.0.1:{free_port()}",
        "QUORUMQUEST_SERVER_STATELOSSGRACE": "0",
    }
    line = config_error_line(service(f"-config={config}", cwd=tmp_path, env=environ))
    assert "config error: server: " in line


def test_an_explicit_directory_without_a_config_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    environ = {"QUORUMQUEST_SERVERADDRESS": f"127.0.0.1:{free_port()}"}
    line = config_error_line(service(f"-config={tmp_path / 'empty'}", cwd=tmp_path, env=environ))
    assert str(tmp_path / "empty") in line
    assert "config.yaml" in line


def test_without_a_config_file_the_start_up_log_names_the_store_the_environment_chose(
    tmp_path: Path,
) -> None:
    environ = {
        "QUORUMQUEST_SERVERADDRESS": f"127.0.0.1:{free_port()}",
        "QUORUMQUEST_BACKEND_TYPE": "redis",
        "QUORUMQUEST_STORE_HOST": "127.0.0.1",
        "QUORUMQUEST_STORE_PORT": str(free_port()),
        "QUORUMQUEST_STORE_TIMEOUT": "0.5",
    }
    process = service(cwd=tmp_path, env=environ)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert "memory store" not in stderr
    assert "no config file found at config; using the redis store" in stderr
