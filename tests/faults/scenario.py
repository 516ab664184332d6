"""One fault scenario: a backend, service instances (behind proxies if need be), racing clients.

`Run` starts everything, waits until the lock has a holder, injects the fault (once
per round), leaves time to recover, races on until enough grants were seen, stops the
clients and returns the merged history. A lag probe (`StallProbe`) in the test process
records its stalls, as the client processes record theirs.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc

from tests.faults.clients import ClientSpec, Plan, ProcessSpec
from tests.faults.cluster import ClientProcess, ServiceInstance
from tests.faults.faults import Fault
from tests.faults.history import (
    PROBE_S,
    STALL_MIN_S,
    Call,
    FaultWindow,
    History,
    Recorder,
    Stall,
    all_beliefs,
    grants,
    read_events,
)
from tests.faults.proxy import Proxy

SOAK_ENV = "QQ_FAULT_SOAK"
# Stores that create their table at start: instances sharing one are started one by one,
# as two creating a new table at once can fail to start (a schema race in the store).
SCHEMA_BACKENDS = {"scylladb", "dynamodb"}
SERVICE = "faults"
# Clients per process: raw-stub clients and SDK clients; two processes.
PROCESSES = 2
RAW_CLIENTS = 2
SDK_CLIENTS = 1
# How long `Run.play` races on after the last recovery, at most, for the grants it needs.
GRANTS_BUDGET_S = 60.0


def soak_rounds() -> int:
    """Fault rounds per scenario: QQ_FAULT_SOAK (default 1)."""
    return max(1, int(os.environ.get(SOAK_ENV) or 1))


@dataclass(frozen=True)
class Timing:
    """Lease and pacing of one scenario, in seconds."""

    ttl: float = 1.5
    hold: tuple[float, float] = (0.1, 1.5)
    poll: tuple[float, float] = (0.05, 0.1)
    warmup: float = 1.5
    grace: float | None = None  # server.stateLossGrace; None: 'auto' (= max_ttl)
    max_ttl: float = 2.0

    @property
    def interval(self) -> float:
        return self.ttl / 3

    @property
    def outage(self) -> float:
        """How long a pause or a partition lasts: longer than a lease."""
        return 2 * self.ttl

    @property
    def grace_s(self) -> float:
        return self.max_ttl if self.grace is None else self.grace

    def bound(self, fault: Fault) -> float:
        """The liveness bound: ttl + keep-alive interval (+ the grace period after a state
        loss, + the store's reconnect delay after a backend restart)."""
        grace = self.grace_s if fault.state_loss else 0.0
        return self.ttl + self.interval + grace + fault.reconnect_s


class StallProbe:
    """The test process's lag probe: a thread that sleeps `PROBE_S` at a time and records
    each wake-up later than `STALL_MIN_S` as a `Stall` (the test process also runs the
    proxies, between the service and its backend)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)

    def _run(self) -> None:
        recorder = Recorder(self.path)
        try:
            while True:
                due = time.monotonic() + PROBE_S
                if self._stop.wait(PROBE_S):
                    return
                woke = time.monotonic()
                if woke - due >= STALL_MIN_S:
                    recorder.record(Stall("test", due, woke))
        finally:
            recorder.close()

    def __enter__(self) -> StallProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Backend:
    """The store a scenario runs on: its type, its `store:` section, and what the fault may touch.

    `process` is a backend process of the scenario's own (to kill, restart, fail over).
    """

    type: str
    store: dict[str, Any] = field(default_factory=dict)
    process: Any = None

    @property
    def port(self) -> int:
        """The backend's port on 127.0.0.1, as the store section names it."""
        if self.type == "redis":
            return urlsplit(self.store["url"]).port or 6379
        endpoint = self.store["endpoints"][0]
        if self.type == "dynamodb":
            return urlsplit(endpoint).port or 80
        return int(endpoint.rpartition(":")[2])

    def via(self, port: int) -> dict[str, Any]:
        """The store section with the backend reached through 127.0.0.1:`port` instead."""
        if self.type == "redis":
            url = urlsplit(self.store["url"])
            return {**self.store, "url": urlunsplit(url._replace(netloc=f"127.0.0.1:{port}"))}
        if self.type == "dynamodb":
            return {**self.store, "endpoints": [f"http://127.0.0.1:{port}"]}
        return {**self.store, "endpoints": [f"127.0.0.1:{port}"]}


class Run:
    """A scenario's processes, from `__enter__` to `__exit__`; `play()` runs the fault rounds."""

    def __init__(self, backend: Backend, fault: Fault, timing: Timing, workdir: Path) -> None:
        self.backend = backend
        self.fault = fault
        self.timing = timing
        self.workdir = workdir
        self.domain = f"lock-{uuid.uuid4().hex[:8]}"
        self.proxies: list[Proxy] = []
        self.instances: list[ServiceInstance] = []
        self.processes: list[ClientProcess] = []
        self._stopped = False

    # -- set-up -------------------------------------------------------------------------

    def config(self, store: dict[str, Any]) -> dict[str, Any]:
        timing = self.timing
        server: dict[str, Any] = {
            "maxTtl": timing.max_ttl,
            "healthInterval": 0.5,
            "shutdownGrace": 0.5,
        }
        if timing.grace is not None:
            server["stateLossGrace"] = timing.grace
        return {
            "backend": {"type": self.backend.type},
            "store": {**store, "ttl": 1},
            "server": server,
            "logger": {"level": "INFO"},
        }

    def plan(self) -> Plan:
        timing = self.timing
        return Plan(SERVICE, self.domain, timing.ttl, timing.hold, timing.poll)

    def client_specs(self) -> list[tuple[ClientSpec, ...]]:
        """Raw clients spread over the instances (each fails over to the next); SDK clients
        given every instance, in a different order per process."""
        addresses = [instance.address for instance in self.instances]
        count = len(addresses)

        def rotated(by: int) -> tuple[str, ...]:
            return tuple(addresses[(by + index) % count] for index in range(count))

        specs = []
        for process in range(PROCESSES):
            raw = [
                ClientSpec(f"p{process}-raw{n}", "raw", rotated(process * RAW_CLIENTS + n))
                for n in range(RAW_CLIENTS)
            ]
            sdk = [
                ClientSpec(f"p{process}-sdk{n}", "sdk", rotated(process))
                for n in range(SDK_CLIENTS)
            ]
            specs.append((*raw, *sdk))
        return specs

    def __enter__(self) -> Run:
        try:
            self._start()
        except BaseException:
            self._stop_all()
            raise
        return self

    def _start(self) -> None:
        for index in range(self.fault.instances):
            store = self.backend.store
            if self.fault.proxied:
                proxy = Proxy(self.backend.port).start()
                self.proxies.append(proxy)
                store = self.backend.via(proxy.port)
            instance = ServiceInstance(f"instance-{index}", self.config(store), self.workdir)
            self.instances.append(instance)
        first, *others = self.instances
        first.launch()
        if self.backend.type in SCHEMA_BACKENDS:
            first.wait_serving()  # it creates the table; the others find it
        for instance in others:
            instance.launch()
        for index, clients in enumerate(self.client_specs()):
            name = f"clients-{index}"
            spec = ProcessSpec(
                out=str(self.workdir / f"{name}.jsonl"),
                ready=str(self.workdir / f"{name}.ready"),
                go=str(self.workdir / "go"),
                seed=int(self.domain.removeprefix("lock-"), 16) + index,
                plan=self.plan(),
                clients=clients,
            )
            process = ClientProcess(name, spec, self.workdir)
            self.processes.append(process)
            process.launch()
        for instance in self.instances:
            instance.wait_serving()
        for process in self.processes:
            process.wait_ready()
        (self.workdir / "go").touch()  # the clients start once every instance serves

    def __exit__(self, *exc_info: object) -> None:
        failures = self._stop_all()
        if failures and exc_info[0] is None:
            raise failures[0]

    def _stop_all(self) -> list[Exception]:
        """Stop clients, instances and proxies; the errors met on the way."""
        failures = []
        for stop in [
            self.stop_clients,
            *(instance.stop for instance in self.instances),
            *(proxy.close for proxy in self.proxies),
        ]:
            try:
                stop()
            except Exception as exc:  # stop the rest all the same
                failures.append(exc)
        return failures

    def stop_clients(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for process in self.processes:
            process.terminate()  # all at once: none races on alone
        for process in self.processes:
            process.stop()

    # -- what faults ask ------------------------------------------------------------------

    def holder(self, budget: float = 5.0) -> str | None:
        """The client holding the lock, as the first instance that answers sees it."""
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            for instance in self.instances:
                if not instance.running:
                    continue
                try:
                    if holder := instance.leader(SERVICE, self.domain):
                        return holder
                except grpc.RpcError:
                    continue
            time.sleep(0.05)
        return None

    def instance_of(self, client: str | None) -> int:
        """The instance that last answered `client` (its first one, for a gRPC target naming
        several); 0 when unknown."""
        addresses = [instance.address for instance in self.instances]
        process = self.process_of(client)
        via = ""
        if client is not None and process.out.exists():
            calls = [e for e in read_events(process.out) if isinstance(e, Call)]
            via = next((c.via for c in reversed(calls) if c.client == client and c.ok), "")
        first = via.removeprefix("ipv4:").split(",")[0]
        return addresses.index(first) if first in addresses else 0

    def process_of(self, client: str | None) -> ClientProcess:
        """The client process running `client` (the first when unknown)."""
        return next((p for p in self.processes if client in p.client_ids), self.processes[0])

    def timed(self, name: str, action: Callable[[], Any], **window: Any) -> FaultWindow:
        """Run `action` (inject, wait, heal) and return its window, from start to heal."""
        start = time.monotonic()
        action()
        return FaultWindow(name, start, time.monotonic(), **window)

    # -- the scenario ---------------------------------------------------------------------

    def settle(self) -> None:
        """Wait until some client holds the lock (a new store starts in its grace period),
        then let the clients race for `warmup` seconds."""
        if self.holder(budget=self.timing.grace_s + 10) is None:
            logs = "\n".join(f"{i.name}: {i.log}" for i in self.instances)
            raise AssertionError(f"no client got the lock; logs:\n{logs}")
        time.sleep(self.timing.warmup)

    def revive(self) -> None:
        """Start again what a fault left down, for the next round."""
        self.fault.restore(self)
        for instance in self.instances:
            if not instance.running:
                instance.start()

    def grants(self) -> int:
        """Grants the clients have recorded so far (as the checker counts them)."""
        calls = [
            event
            for process in self.processes
            if process.out.exists()
            for event in read_events(process.out)
            if isinstance(event, Call)
        ]
        return grants(all_beliefs(calls))

    def race_on(self, min_grants: int, budget: float = GRANTS_BUDGET_S) -> None:
        """Let the clients race until they have `min_grants` grants, for `budget` s at most:
        on a loaded machine a fault may take long to recover from, and the scenario must
        still have grants to judge. Too few after that are the checker's to report."""
        deadline = time.monotonic() + budget
        while self.grants() < min_grants and time.monotonic() < deadline:
            time.sleep(0.25)

    def play(self, rounds: int, min_grants: int = 0) -> History:
        """Inject the fault `rounds` times, each followed by time to recover, then race on
        once some client holds the lock again, until `min_grants` grants were seen (or
        `GRANTS_BUDGET_S` passed); the history."""
        recovery = self.timing.bound(self.fault) + 1.0
        faults = Recorder(self.workdir / "faults.jsonl")
        probe = StallProbe(self.workdir / "stalls-test.jsonl")
        with probe:
            self.settle()
            for round_ in range(rounds):
                if round_:
                    self.revive()
                    self.settle()
                window = self.fault.inject(self)
                faults.record(window)
                time.sleep(recovery)
            # Let the clients race on after the last recovery too, so that a fault that left
            # the backend slow to come back still leaves grants to judge.
            self.settle()
            self.race_on(min_grants)
            stop = time.monotonic()
        faults.close()
        self.stop_clients()
        outs = [faults.path, probe.path, *(process.out for process in self.processes)]
        return History.load(outs, stop)
