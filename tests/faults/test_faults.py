"""Fault injection: clients race for one lock while a fault strikes; the history is checked.

Each scenario prints one line (`FAULT <backend> <fault>: ...`, see conftest.py) and
fails on any overlap of beliefs, any token that does not rise, any act outside a
belief, too few grants, or a takeover slower than ttl + keep-alive interval (+ the
grace period after a state loss; a grant to a client that could not believe it, being
paused, counts as a holder that disappeared when it was granted).
QQ_FAULT_SOAK=N injects each fault N times.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from quorum_quest._rpc import LeaderElectionStub, pb
from tests.faults.clients import record_calls
from tests.faults.cluster import ServiceInstance
from tests.faults.faults import (
    Fault,
    KillInstance,
    Latency,
    Partition,
    PauseClient,
    PauseInstance,
    RestartBackend,
    RestartInstance,
    SentinelFailover,
)
from tests.faults.history import History, Recorder, Report, check
from tests.faults.proxy import Proxy
from tests.faults.scenario import Backend, Run, Timing, soak_rounds

pytestmark = pytest.mark.faults

ROUNDS = soak_rounds()
# Seconds a scenario may take per round, set-up and the backend's own start included.
TIMEOUT_PER_ROUND_S = 60
# Grants a scenario must see per round, so that it cannot pass without racing at all.
MIN_GRANTS_PER_ROUND = 4

_MARKS = {
    "redis": pytest.mark.redis,
    "scylladb": pytest.mark.scylladb,
    "dynamodb": pytest.mark.dynamodb,
}
# A stale entry fails the scenario like an overlap does.
SDK_EXPIRED_ENTRY = (
    "leadership() entered its body with a lease that had already expired (a grant answered"
    " after its deadline): leader work on entry ran without a valid lease"
)
_SHARED_FAULTS: list[Fault] = [
    KillInstance(),
    PauseInstance(),
    PauseClient(),
    Partition(),
    Latency(),
]
_OWN_BACKEND_FAULTS: dict[str, list[Fault]] = {
    "redis": [RestartBackend(state_loss=True), SentinelFailover()],
    # A durable node replays its commit log: an outage, with no state lost.
    "scylladb": [RestartBackend(state_loss=False)],
    # dynalite keeps its tables in memory: a restart loses them.
    "dynamodb": [RestartBackend(state_loss=True)],
}


def _scenarios() -> list[object]:
    single = [RestartInstance(instances=1), PauseInstance(instances=1), PauseClient(instances=1)]
    params = [pytest.param("memory", fault, id=f"memory-{fault.name}") for fault in single]
    for backend, mark in _MARKS.items():
        params += [
            pytest.param(backend, fault, id=f"{backend}-{fault.name}", marks=mark)
            for fault in [*_SHARED_FAULTS, *_OWN_BACKEND_FAULTS[backend]]
        ]
    return params


def run_scenario(backend: Backend, fault: Fault, timing: Timing, workdir: Path) -> Report:
    with Run(backend, fault, timing, workdir) as run:
        history = run.play(ROUNDS)
    return check(history)


@pytest.mark.timeout(TIMEOUT_PER_ROUND_S * ROUNDS + 120)
@pytest.mark.parametrize(("variant", "fault"), _scenarios())
def test_fault(
    variant: str,
    fault: Fault,
    scenario_backend: Callable[[str, Fault], Backend],
    fault_summary: Callable[[str], None],
    tmp_path: Path,
) -> None:
    timing = Timing()
    report = run_scenario(scenario_backend(variant, fault), fault, timing, tmp_path)
    bound = timing.bound(fault)
    fault_summary(report.summary(variant, fault.name, bound))
    logs = f"logs: {tmp_path}"
    assert not (unsafe := report.safety_problems()), "\n".join([*unsafe, logs])
    assert not report.stale_entries, "\n".join(
        [f"{SDK_EXPIRED_ENTRY}: {report.stale_entries[0]}", logs]
    )
    slow = report.liveness_problems(bound, min_grants=MIN_GRANTS_PER_ROUND * ROUNDS)
    assert not slow, "\n".join([*slow, logs])


@pytest.mark.timeout(120)
def test_a_restart_without_grace_period_is_caught(
    scenario_backend: Callable[[str, Fault], Backend],
    fault_summary: Callable[[str], None],
    tmp_path: Path,
) -> None:
    """The checker must catch a real violation end to end: with the grace period off, a
    restarted embedded store grants the lock again while its holder still believes.

    Long leases, held longer than the restart takes, make the overlap certain.
    """
    fault = RestartInstance(instances=1)
    timing = Timing(ttl=6.0, max_ttl=6.0, grace=0.0, hold=(20.0, 30.0))
    report = run_scenario(scenario_backend("memory", fault), fault, timing, tmp_path)
    fault_summary(report.summary("memory", "restart-without-grace", timing.bound(fault)))
    assert report.overlaps, f"no overlap detected; logs: {tmp_path}"


async def _late_keep_alive(
    behind: str, direct: str, proxy: Proxy, ttl: float, recorder: Recorder
) -> None:
    """C holds the lock; its keep-alive K1 goes to the instance `behind` the cut link and is
    given up on, K2 succeeds on the `direct` one; the link heals, K1 reaches the backend
    late; D polls for the lock until C's belief has surely ended."""
    lock = {"service": "faults", "domain": f"lock-{uuid.uuid4().hex[:8]}"}
    lease = {**lock, "ttl_ms": round(ttl * 1000)}
    async with grpc.aio.insecure_channel(behind) as cut, grpc.aio.insecure_channel(direct) as ok:
        c_cut, c, d = LeaderElectionStub(cut), LeaderElectionStub(ok), LeaderElectionStub(ok)
        record_calls(c_cut, "C", behind, recorder)
        record_calls(c, "C", direct, recorder)
        record_calls(d, "D", direct, recorder)
        granted = await c.try_acquire_lock(pb.TryAcquireLockRequest(client_id="C", **lease))
        assert granted.is_leader
        await asyncio.sleep(0.3)
        proxy.blackhole()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await c_cut.keep_alive(pb.KeepAliveRequest(client_id="C", **lease), timeout=0.5)
        await asyncio.sleep(0.5)
        renewed_at = time.monotonic()
        await c.keep_alive(pb.KeepAliveRequest(client_id="C", **lease), timeout=1)
        proxy.heal()
        while time.monotonic() < renewed_at + ttl + 1:
            answer = await d.try_acquire_lock(pb.TryAcquireLockRequest(client_id="D", **lease))
            if answer.is_leader:
                return
            await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("scylladb", marks=pytest.mark.scylladb),
        pytest.param("dynamodb", marks=pytest.mark.dynamodb),
    ],
)
def test_a_keep_alive_delivered_late_never_shortens_a_lease(
    variant: str,
    scenario_backend: Callable[[str, Fault], Backend],
    fault_summary: Callable[[str], None],
    tmp_path: Path,
) -> None:
    """The partition fault's nasty case made certain: a renewal held up in a partition and
    delivered after a later one succeeded. Two instances, one behind the cut link."""
    fault = Partition()
    timing = Timing(ttl=2.0, max_ttl=3.0, grace=0.0)
    backend = scenario_backend(variant, fault)
    recorder = Recorder(tmp_path / "calls.jsonl")
    with Proxy(backend.port) as proxy, ExitStack() as stack:
        config = {
            "backend": {"type": backend.type},
            "server": {"maxTtl": timing.max_ttl, "stateLossGrace": 0},
        }
        direct = ServiceInstance("direct", config | {"store": backend.store | {"ttl": 1}}, tmp_path)
        behind = ServiceInstance(
            "behind", config | {"store": backend.via(proxy.port) | {"ttl": 1}}, tmp_path
        )
        for instance in (direct, behind):
            stack.callback(instance.stop)
            instance.start()
        asyncio.run(_late_keep_alive(behind.address, direct.address, proxy, timing.ttl, recorder))
    recorder.close()
    report = check(History.load([recorder.path], stop=time.monotonic()))
    fault_summary(report.summary(variant, "late-keep-alive", timing.bound(fault)))
    assert not report.overlaps, "\n".join([*report.safety_problems(), f"logs: {tmp_path}"])
