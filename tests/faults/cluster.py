"""The processes of a fault scenario: service instances and client processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quorum_quest._rpc import METHODS, pb
from tests.backends import DIE_WITH_PARENT, free_port
from tests.faults.clients import ProcessSpec

REPO = Path(__file__).resolve().parents[2]
START_BUDGET_S = 30.0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _send(process: subprocess.Popen[bytes] | None, signum: int) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signum)


class ServiceInstance:
    """One `quorum-quest-service` process with a config file of its own, on a fixed port."""

    def __init__(self, name: str, config: dict[str, Any], workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.config_file = workdir / f"{name}.yaml"
        self.config_file.write_text(
            yaml.safe_dump({**config, "serverAddress": self.address}, sort_keys=False)
        )
        self.log = workdir / f"{name}.log"
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*DIE_WITH_PARENT, "-m", "quorum_quest.cli", "--config", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )

    def wait_serving(self, budget: float = START_BUDGET_S) -> float:
        """Wait until health says SERVING; the time it did."""
        deadline = time.monotonic() + budget
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.running:
                    raise RuntimeError(f"{self.name} exited during start:\n{_tail(self.log)}")
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic()
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not serve within {budget:g} s:\n{_tail(self.log)}")

    def start(self) -> float:
        self.launch()
        return self.wait_serving()

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        _send(self.process, signal.SIGSTOP)

    def resume(self) -> None:
        _send(self.process, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (resumed first, if paused); SIGKILL if it lingers."""
        self.resume()
        _send(self.process, signal.SIGTERM)
        if self.process is not None:
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def leader(self, service: str, domain: str) -> str | None:
        """The holder's client_id as this instance's store sees it, or None."""
        method = next(method for method in METHODS if method.name == "GetLeader")
        with grpc.insecure_channel(self.address) as channel:
            call = channel.unary_unary(
                method.path,
                request_serializer=method.request.SerializeToString,
                response_deserializer=method.response.FromString,
            )
            answer = call(pb.GetLeaderRequest(service=service, domain=domain), timeout=0.5)
        return answer.client_id if answer.has_leader else None


class ClientProcess:
    """A process running some of the clients (`tests.faults.clients`), recording to a file."""

    def __init__(self, name: str, spec: ProcessSpec, workdir: Path) -> None:
        self.name = name
        self.spec = spec
        self.out = Path(spec.out)
        self.log = workdir / f"{name}.log"
        self.spec_file = workdir / f"{name}.json"
        self.spec_file.write_text(spec.dumps())
        self.process: subprocess.Popen[bytes] | None = None
        self._terminated = False

    @property
    def client_ids(self) -> tuple[str, ...]:
        return tuple(client.id for client in self.spec.clients)

    def launch(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*DIE_WITH_PARENT, "-m", "tests.faults.clients", str(self.spec_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )

    def wait_ready(self, budget: float = START_BUDGET_S) -> None:
        deadline = time.monotonic() + budget
        while not Path(self.spec.ready).exists():
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start:\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {budget:g} s")
            time.sleep(0.05)

    def pause(self) -> None:
        _send(self.process, signal.SIGSTOP)

    def resume(self) -> None:
        _send(self.process, signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM, once (resumed first, if paused): the clients stop; `stop()` waits."""
        if not self._terminated:
            self._terminated = True
            self.resume()
            _send(self.process, signal.SIGTERM)

    def stop(self) -> None:
        """`terminate()`, and wait; fails when the clients did not end cleanly."""
        if self.process is None:
            return
        self.terminate()
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise RuntimeError(f"{self.name} did not stop on SIGTERM:\n{_tail(self.log)}") from None
        if code != 0:
            raise RuntimeError(f"{self.name} failed (exit status {code}):\n{_tail(self.log)}")
