"""A CQL server for the tests of the scylladb store: Apache Cassandra from Maven Central.

`QQ_TEST_CQL_HOSTS` (`host:port[,...]`, the first is used) points the tests at a CQL server you run
yourself. Otherwise one Apache Cassandra node is started as a JVM process from the
jars that `scripts/setup/cassandra.sh` resolved (`QQ_CASSANDRA_LIB`, or the same
default folder), on free loopback ports with a small heap and its data in a temporary
folder, once per test session. Where no jars are there but a Docker engine runs, a
testcontainers ScyllaDB is started instead. A CQL server that cannot be started fails
the run; it is never skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.backends import DIE_WITH_PARENT, docker_engine_available, free_port

VARIANTS = [pytest.param("scylladb", marks=pytest.mark.scylladb)]

CASSANDRA_VERSION = os.environ.get("QQ_CASSANDRA_VERSION", "5.0.8")
START_BUDGET_S = 120.0
TEST_KEYSPACE = "qq_test"
# One machine, one clock: no skew to allow for, but a small margin keeps its code path.
CONTRACT_CLOCK_SKEW_MARGIN = 0.05
# Seconds per CQL request in the tests' stores: see `scylladb_store_config`.
CONTRACT_REQUEST_TIMEOUT_S = 30.0

# From Cassandra 5.0's conf/jvm17-server.options: what its code needs opened on Java 17.
_EXPORTS = [
    "java.base/jdk.internal.misc",
    "java.management.rmi/com.sun.jmx.remote.internal.rmi",
    "java.management/com.sun.jmx.remote.security",
    "java.rmi/sun.rmi.registry",
    "java.rmi/sun.rmi.server",
    "java.sql/java.sql",
    "java.base/java.lang.ref",
    "jdk.unsupported/sun.misc",
]
_OPENS = [
    "java.base/java.lang.module",
    "java.base/jdk.internal.loader",
    "java.base/jdk.internal.ref",
    "java.base/jdk.internal.reflect",
    "java.base/jdk.internal.math",
    "java.base/jdk.internal.module",
    "java.base/jdk.internal.util.jar",
    "jdk.management/com.sun.management.internal",
    "java.base/sun.nio.ch",
    "java.base/java.io",
    "java.base/java.lang.reflect",
    "java.base/java.lang",
    "java.base/java.util",
    "java.base/java.nio",
]

_CASSANDRA_YAML = """\
cluster_name: quorum-quest-tests
num_tokens: 1
initial_token: "0"
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: {storage_port}
native_transport_port: {cql_port}
{commitlog_sync}
auto_snapshot: false
hinted_handoff_enabled: false
concurrent_reads: 4
concurrent_writes: 4
concurrent_counter_writes: 2
concurrent_compactors: 1
# Two busy cores, shared: give Paxos rounds room before they count as timed out (an
# LWT that times out has an unknown outcome, which no test that is not about it expects).
cas_contention_timeout: 20000ms
write_request_timeout: 20000ms
read_request_timeout: 20000ms
"""

# Periodic sync replays nothing written after the last sync (every 10 s) when the node is
# killed; batch sync acknowledges a write only once the commit log is synced.
_COMMITLOG_SYNC = {
    False: "commitlog_sync: periodic\ncommitlog_sync_period: 10s",
    True: "commitlog_sync: batch",
}

_LOGBACK_XML = """\
<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{log}</file>
    <encoder><pattern>%d{{HH:mm:ss.SSS}} %-5level [%thread] %logger{{0}} %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
"""


def cassandra_lib() -> Path:
    """Where scripts/setup/cassandra.sh put the jars (the same variable and default)."""
    if lib := os.environ.get("QQ_CASSANDRA_LIB"):
        return Path(lib)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "quorum-quest" / f"cassandra-{CASSANDRA_VERSION}" / "lib"


def cql_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a CQL server answers an OPTIONS request (native protocol v4) on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">BBhBi", 0x04, 0, 0, 0x05, 0))  # OPTIONS, stream 0
            header = b""
            while len(header) < 9:
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    return False
                header += chunk
    except OSError:
        return False
    return header[0] & 0x80 == 0x80 and header[4] == 0x06  # a response, SUPPORTED


class CassandraProcess:
    """One throw-away Apache Cassandra node on 127.0.0.1, its data in a temporary folder.

    Only a `durable` node keeps all its data through `kill` and `restart`: it syncs the
    commit log before acknowledging a write and flushes every schema change (a table
    takes ~4x as long to create). Otherwise a kill loses the last 10 s of writes and the
    tables created since the start (`cassandra.unsafesystem`).
    """

    def __init__(self, lib: Path | None = None, heap: str = "1G", durable: bool = False) -> None:
        self.lib = lib or cassandra_lib()
        self.heap = heap
        self.durable = durable
        self.cql_port = free_port()
        self.storage_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="qq-cassandra-"))
        self.log = self.workdir / "logs" / "system.log"
        self.console = self.workdir / "logs" / "console.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.cql_port}"

    def command(self) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("java is not on PATH (scripts/setup/cassandra.sh installs it)")
        jars = sorted(self.lib.glob("*.jar"))
        jamm = [jar for jar in jars if jar.name.startswith("jamm-")]
        if not jars or not jamm:
            raise RuntimeError(
                f"no Cassandra jars in {self.lib} (run scripts/setup/cassandra.sh, which "
                "./scripts/test sources, or set QQ_TEST_CQL_HOSTS)"
            )
        conf, tmp = self.workdir / "conf", self.workdir / "tmp"
        for folder in (conf, tmp, self.log.parent):
            folder.mkdir(parents=True, exist_ok=True)
        (conf / "cassandra.yaml").write_text(
            _CASSANDRA_YAML.format(
                storage_port=self.storage_port,
                cql_port=self.cql_port,
                commitlog_sync=_COMMITLOG_SYNC[self.durable],
            )
        )
        (conf / "logback.xml").write_text(_LOGBACK_XML.format(log=self.log))
        return [
            java,
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-Xss256k",
            "-XX:+UseG1GC",
            "-XX:+ExitOnOutOfMemoryError",
            "-XX:TieredStopAtLevel=1",  # C1 only: a faster start, and less CPU on 2 cores
            f"-javaagent:{jamm[0]}",
            "-Djdk.attach.allowAttachSelf=true",
            *(f"--add-exports={module}=ALL-UNNAMED" for module in _EXPORTS),
            *(f"--add-opens={module}=ALL-UNNAMED" for module in _OPENS),
            "-Dio.netty.tryReflectionSetAccessible=true",
            "-Djava.net.preferIPv4Stack=true",
            f"-Djava.io.tmpdir={tmp}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.config={(conf / 'cassandra.yaml').as_uri()}",
            f"-Dcassandra.storagedir={self.workdir / 'data'}",
            f"-Dcassandra.logdir={self.log.parent}",
            f"-Dcassandra.triggers_dir={conf / 'triggers'}",
            f"-Dlogback.configurationFile={conf / 'logback.xml'}",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=1000",
            *([] if self.durable else ["-Dcassandra.unsafesystem=true"]),
            "-cp",
            os.pathsep.join(str(jar) for jar in jars),
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    def start(self, budget_s: float = START_BUDGET_S) -> CassandraProcess:
        command = self.command()
        started = time.monotonic()
        with self.console.open("ab") as console:
            self.process = subprocess.Popen(
                [*DIE_WITH_PARENT, *command],  # no 1 GB JVM outlives the test process
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        deadline = started + budget_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"exited with status {self.process.returncode} during startup")
            if "Exception encountered during startup" in self._read(self.log):
                self._fail("reported 'Exception encountered during startup'")
            if cql_answers("127.0.0.1", self.cql_port):
                self.startup_s = time.monotonic() - started
                return self
            time.sleep(0.25)
        self._fail(f"did not accept CQL on {self.endpoint} within {budget_s:g} s")
        raise AssertionError("unreachable")

    def _fail(self, what: str) -> None:
        tail = "\n".join(
            (self._read(self.log).splitlines() + self._read(self.console).splitlines())[-25:]
        )
        self.kill()
        raise RuntimeError(f"Apache Cassandra {what} (logs in {self.workdir}):\n{tail}")

    @staticmethod
    def _read(file: Path) -> str:
        try:
            return file.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, not drained (a graceful stop takes ~15 s); its folder stays for `restart`."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self, budget_s: float = START_BUDGET_S) -> CassandraProcess:
        """Kill if running, then start again on the same ports and folder.

        A `durable` node comes back with every acknowledged write, from its commit log.
        As at the first start, the node dies with the thread that starts it
        (PR_SET_PDEATHSIG): restart it from a long-lived one, not a short-lived worker.
        """
        self.kill()
        return self.start(budget_s)

    def __enter__(self) -> CassandraProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def scylla_container() -> Iterator[str]:
    """A ScyllaDB container (developer machines with a Docker engine)."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    container = DockerContainer("scylladb/scylla:latest").with_exposed_ports(9042)
    container.with_command("--smp 1 --memory 750M --overprovisioned 1 --developer-mode 1")
    with container:
        wait_for_logs(container, "Starting listening for CQL clients", timeout=START_BUDGET_S)
        host, port = container.get_container_host_ip(), int(container.get_exposed_port(9042))
        deadline = time.monotonic() + 30
        while not cql_answers(host, port) and time.monotonic() < deadline:
            time.sleep(0.5)
        yield f"{host}:{port}"


@contextmanager
def cql_server() -> Iterator[str]:
    """The host:port of a CQL server for the whole test session."""
    if hosts := os.environ.get("QQ_TEST_CQL_HOSTS"):
        # An existing cluster: its first contact point must answer.
        endpoint = hosts.split(",")[0].strip()
        host, _, port = endpoint.rpartition(":")
        if not cql_answers(host.strip("[]"), int(port), timeout=5):
            raise RuntimeError(f"QQ_TEST_CQL_HOSTS: {endpoint} does not answer CQL")
        yield endpoint
    elif (cassandra_lib() / ".complete").is_file() or not docker_engine_available():
        with CassandraProcess() as node:
            print(
                f"\nApache Cassandra {CASSANDRA_VERSION} accepted CQL after {node.startup_s:.1f} s"
            )
            yield node.endpoint
    else:
        with scylla_container() as endpoint:
            yield endpoint


@pytest.fixture(scope="session")
def cql_endpoint() -> Iterator[str]:
    try:
        with cql_server() as endpoint:
            yield endpoint
    except (RuntimeError, OSError, ValueError) as exc:
        pytest.fail(f"a CQL server is required and could not be started: {exc}", pytrace=False)


@pytest.fixture
def scylladb_store_config(cql_endpoint: str) -> dict[str, Any]:
    """A store section of its own: a fresh table, created by the store at start."""
    return {
        "endpoints": [cql_endpoint],
        "keyspace": TEST_KEYSPACE,
        "table": f"locks_{uuid.uuid4().hex[:12]}",
        "consistency": "CONSISTENCY_QUORUM",
        "clock_skew_margin": CONTRACT_CLOCK_SKEW_MARGIN,
        # Longer than the node's own timeouts (above), so that its answer comes first;
        # no test that is not about timeouts may depend on speed.
        "request_timeout": CONTRACT_REQUEST_TIMEOUT_S,
    }
