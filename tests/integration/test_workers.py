"""`server.workers` > 1: the workers live and die with their supervisor."""

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

# Generous: a loaded 2-core machine starts two Python services slowly.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


def health_check(port: int) -> None:
    """One health check on `port`; raises `grpc.RpcError` when nothing answers there."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)


def wait_serving(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"service exited early:\n{log.read_text()}")
        try:
            health_check(port)
            return
        except grpc.RpcError:
            time.sleep(0.1)
    raise AssertionError(f"service did not start serving:\n{log.read_text()}")


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pid: int) -> bool:
    """True once `pid` has exited: no such process, or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


@pytest.mark.redis
def test_workers_exit_and_the_port_closes_when_the_supervisor_is_killed(
    tmp_path: Path, redis_url: str
) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f'serverAddress: "127.0.0.1:{port}"\nbackend: {{type: redis}}\n'
        f'store: {{url: "{redis_url}"}}\nserver: {{workers: 2, shutdownGrace: 1}}\n'
    )
    log = tmp_path / "service.log"
    # A file, not a pipe: the workers outlive the supervisor's end of a pipe here.
    with log.open("wb") as output:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "quorum_quest.cli", f"-config={config}"],
            cwd=tmp_path,
            stdout=output,
            stderr=output,
        )
    workers: list[int] = []
    try:
        wait_serving(port, supervisor, log)
        workers = children_of(supervisor.pid)
        assert len(workers) == 2
        supervisor.kill()  # SIGKILL: the supervisor cannot pass anything on
        supervisor.wait(30)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while not all(gone(worker) for worker in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(worker) for worker in workers), log.read_text()
        with pytest.raises(grpc.RpcError) as refused:
            health_check(port)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        supervisor.kill()
        for worker in workers:
            if not gone(worker):
                os.kill(worker, signal.SIGKILL)


# A worker as `follow_supervisor` leaves it where the kernel cannot signal a parent's
# death (not Linux): it must notice by itself. It says when it follows, and when SIGTERM
# comes, unless `IGNORE` tells it to ignore SIGTERM (a worker whose stop hangs).
FOLLOWER = """
import os, signal, sys, time
from quorum_quest.server import workers
workers._signal_at_parent_death = lambda signum: False
if sys.argv[1] == "IGNORE":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: (print("SIGTERM", flush=True), sys.exit(0)))
workers.follow_supervisor(os.getppid(), 1.0)
print("following", flush=True)
while True:
    time.sleep(1)
"""
# The follower's parent: starts it, says its pid, and waits to be killed.
PARENT = """
import subprocess, sys, time
follower = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=sys.stderr)
print(follower.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("termination", ["SIGTERM", "IGNORE"])
def test_without_the_kernels_help_a_worker_stops_when_its_supervisor_dies(
    tmp_path: Path, termination: str
) -> None:
    """SIGTERM to itself, and if that does not end it in time, exit."""
    log = tmp_path / "follower.log"
    with log.open("wb") as output:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT, FOLLOWER, termination],
            stdout=subprocess.PIPE,
            stderr=output,
            text=True,
        )
    follower = 0
    try:
        assert parent.stdout is not None
        follower = int(parent.stdout.readline())
        deadline = time.monotonic() + START_TIMEOUT_S
        while "following" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "following" in log.read_text()
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while not gone(follower) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(follower), log.read_text()
    finally:
        parent.kill()
        if follower and not gone(follower):
            os.kill(follower, signal.SIGKILL)
    text = log.read_text()
    assert "the supervisor (pid" in text
    if termination == "SIGTERM":
        assert "SIGTERM" in text
    else:
        assert "exiting" in text
