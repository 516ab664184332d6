"""The fault suite's backends, and its summary: one FAULT line per backend x fault.

The lines are printed in pytest's terminal summary (pytest captures what tests
print) and written to reports/faults.txt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from tests.backends.cassandra import CassandraProcess
from tests.backends.dynamodb import dynalite_process
from tests.backends.redis import RedisProcess
from tests.backends.redis_cluster import RedisCluster
from tests.backends.sentinel import SentinelTopology
from tests.faults.faults import (
    ClusterFailover,
    ClusterPrimaryRestart,
    ClusterSlotMigration,
    Fault,
    SentinelFailover,
)
from tests.faults.scenario import Backend

_LINES = pytest.StashKey[list[str]]()
REPORT = "reports/faults.txt"

# Store timeouts well under a lease, so that a stuck backend call is given up in time.
_TIMEOUTS = {
    "redis": {"timeout": 1.0},
    "scylladb": {"request_timeout": 2.0, "connect_timeout": 2.0, "clock_skew_margin": 0.05},
    "dynamodb": {"timeout": 1.0, "clock_skew_margin": 0.05},
}
# The fixture giving a fresh, isolated `store:` section on the session's backend.
_SESSION_STORE = {
    "redis": "redis_store_config",
    "scylladb": "scylladb_store_config",
    "dynamodb": "dynamodb_dynalite_store_config",
}


@pytest.fixture
def fault_summary(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Adds a line to the suite's summary."""
    return request.config.stash.setdefault(_LINES, []).append


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(_LINES, [])
    if lines:
        terminalreporter.section("fault injection")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    lines = session.config.stash.get(_LINES, [])
    if lines:
        report = session.config.rootpath / REPORT
        report.parent.mkdir(exist_ok=True)
        report.write_text("".join(f"{line}\n" for line in lines))


def _own_backend(backend: str, fault: Fault, stack: ExitStack) -> Backend:
    """A backend process for this scenario alone, which the fault may kill."""
    if isinstance(fault, SentinelFailover):
        topology = stack.enter_context(SentinelTopology())
        store = {"sentinels": topology.sentinel_addresses, "master_name": topology.master_name}
        return Backend(backend, store | _TIMEOUTS[backend], topology)
    if isinstance(fault, ClusterFailover | ClusterPrimaryRestart | ClusterSlotMigration):
        cluster = stack.enter_context(RedisCluster())
        store = {"cluster": True, "nodes": cluster.seeds[:2]}
        return Backend(backend, store | _TIMEOUTS[backend], cluster)
    if backend == "redis":
        server = stack.enter_context(RedisProcess())
        return Backend(backend, {"url": server.url} | _TIMEOUTS[backend], server)
    if backend == "scylladb":
        node = stack.enter_context(CassandraProcess(heap="512M", durable=True))
        store = {"endpoints": [node.endpoint], "keyspace": "qq_faults", "table": "locks"}
        return Backend(backend, store | _TIMEOUTS[backend], node)
    emulator = stack.enter_context(dynalite_process())
    return Backend(backend, emulator.endpoint.store_config() | _TIMEOUTS[backend], emulator)


@pytest.fixture
def scenario_backend(request: pytest.FixtureRequest) -> Iterator[Callable[[str, Fault], Backend]]:
    """Gives the backend a scenario runs on: the session's, with a fresh key prefix or table,
    or, for a fault that touches the backend process, one of its own."""
    with ExitStack() as stack:

        def backend_for(backend: str, fault: Fault) -> Backend:
            if backend == "memory":
                return Backend("memory")
            if fault.own_backend:
                return _own_backend(backend, fault, stack)
            store = request.getfixturevalue(_SESSION_STORE[backend])
            return Backend(backend, store | _TIMEOUTS[backend])

        yield backend_for
