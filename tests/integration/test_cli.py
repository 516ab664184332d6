"""`quorum-quest-service` as a user runs it: config paths, errors, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.backends import free_port


def service(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "quorum_quest.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_serving(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
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


def test_unreachable_store_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f'serverAddress: "127.0.0.1:{free_port()}"\nbackend: {{type: redis}}\n'
        f"store: {{host: 127.0.0.1, port: {free_port()}, timeout: 0.5}}\n"
    )
    process = service(f"-config={config}", cwd=tmp_path)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 1
    assert "cannot start: redis store unavailable" in stderr
    assert "Traceback" not in stderr


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
