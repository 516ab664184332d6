"""Fault injection: clients race for one lock while a fault strikes; the history is checked.

Each scenario prints one line (`FAULT <backend> <fault>: ...`, see conftest.py) and
fails on any overlap of beliefs, any token that does not rise, any act outside a
belief, too few grants (after racing on for up to `GRANTS_BUDGET_S` for them), or a
takeover slower than ttl + keep-alive interval (+ the grace period after a state loss;
+ the longest stall a lag probe measured within it, the time a process could not run
on a loaded machine; a grant to a client that could not believe it, being paused,
counts as a holder that disappeared when it was granted).
QQ_FAULT_SOAK=N injects each fault N times.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.stores.scylladb import RECONNECT_DELAY_MS
from tests.faults.clients import observed, record_calls
from tests.faults.cluster import ServiceInstance
from tests.faults.faults import (
    ClusterFailover,
    ClusterPrimaryRestart,
    ClusterSlotMigration,
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
from tests.faults.history import KEEP_ALIVE, History, Recorder, Report, check
from tests.faults.proxy import Proxy
from tests.faults.scenario import GRANTS_BUDGET_S, Backend, Run, Timing, soak_rounds

pytestmark = pytest.mark.faults

ROUNDS = soak_rounds()
# Seconds a scenario may take per round, set-up and the backend's own start included
# (plus, once, `GRANTS_BUDGET_S` to race on for its grants).
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
    "redis": [
        RestartBackend(state_loss=True),
        SentinelFailover(),
        ClusterFailover(),
        ClusterPrimaryRestart(),
        ClusterSlotMigration(),
    ],
    # A durable node replays its commit log: an outage, with no state lost.
    "scylladb": [
        RestartBackend(state_loss=False, reconnect_s=RECONNECT_DELAY_MS / 1000, until_serving=True)
    ],
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


def run_scenario(
    backend: Backend, fault: Fault, timing: Timing, workdir: Path, min_grants: int = 0
) -> Report:
    with Run(backend, fault, timing, workdir) as run:
        history = run.play(ROUNDS, min_grants)
    return check(history)


@pytest.mark.timeout(TIMEOUT_PER_ROUND_S * ROUNDS + GRANTS_BUDGET_S + 120)
@pytest.mark.parametrize(("variant", "fault"), _scenarios())
def test_fault(
    variant: str,
    fault: Fault,
    scenario_backend: Callable[[str, Fault], Backend],
    fault_summary: Callable[[str], None],
    tmp_path: Path,
) -> None:
    timing = Timing()
    min_grants = MIN_GRANTS_PER_ROUND * ROUNDS
    backend = scenario_backend(variant, fault)
    report = run_scenario(backend, fault, timing, tmp_path, min_grants)
    bound = timing.bound(fault)
    fault_summary(report.summary(variant, fault.name, bound))
    logs = f"logs: {tmp_path}"
    assert not (unsafe := report.safety_problems()), "\n".join([*unsafe, logs])
    assert not report.stale_entries, "\n".join(
        [f"{SDK_EXPIRED_ENTRY}: {report.stale_entries[0]}", logs]
    )
    slow = report.liveness_problems(bound, min_grants=min_grants)
    assert not slow, "\n".join([*slow, logs])


@pytest.mark.timeout(180)
def test_a_restart_without_grace_period_is_caught(
    scenario_backend: Callable[[str, Fault], Backend],
    fault_summary: Callable[[str], None],
    tmp_path: Path,
) -> None:
    """The checker must catch a real violation end to end: with the grace period off, a
    restarted embedded store grants the lock again while its holder still believes.

    Long leases, held longer than the restart takes, make the overlap certain: the holder
    believes for 20 s at least after the kill, and a restart on a loaded machine has
    taken 17 s.
    """
    fault = RestartInstance(instances=1)
    timing = Timing(ttl=30.0, max_ttl=30.0, grace=0.0, hold=(90.0, 120.0))
    report = run_scenario(scenario_backend("memory", fault), fault, timing, tmp_path)
    fault_summary(report.summary("memory", "restart-without-grace", timing.bound(fault)))
    assert report.overlaps, f"no overlap detected; logs: {tmp_path}"


# The set-up calls of the late keep-alive test (not what it judges) are retried on these,
# for up to SETUP_BUDGET_S: on a loaded machine the store's short timeouts can run out.
SETUP_RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
SETUP_BUDGET_S = 60.0


async def _answered(
    method: Callable[..., Awaitable[Any]],
    request: Any,
    until: float,
    timeout: float | None = None,
) -> tuple[float, Any] | None:
    """When the answered call was sent, and `method`'s answer, retried on `SETUP_RETRIED`
    errors; None once `until` has passed without one."""
    while True:
        send = time.monotonic()
        try:
            return send, await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in SETUP_RETRIED:
                raise
            if time.monotonic() >= until:
                return None
            await asyncio.sleep(0.1)


async def _late_keep_alive_once(
    behind: str, direct: str, proxy: Proxy, ttl: float, recorder: Recorder, until: float
) -> bool:
    """C holds the lock; its keep-alive K1 goes to the instance `behind` the cut link and is
    given up on, K2 succeeds on the `direct` one; the link heals, K1 reaches the backend
    late; D polls for the lock until C's belief has surely ended.

    False when the set-up could not be made: C's acquire unanswered before `until`, or
    K2 not renewing before C's lease may have lapsed (the store too slow to answer)."""
    lock = {"service": "faults", "domain": f"lock-{uuid.uuid4().hex[:8]}"}
    lease = {**lock, "ttl_ms": round(ttl * 1000)}
    async with grpc.aio.insecure_channel(behind) as cut, grpc.aio.insecure_channel(direct) as ok:
        c_cut, c, d = LeaderElectionStub(cut), LeaderElectionStub(ok), LeaderElectionStub(ok)
        record_calls(c_cut, "C", behind, recorder)
        record_calls(c, "C", direct, recorder)
        record_calls(d, "D", direct, recorder)
        acquire = pb.TryAcquireLockRequest(client_id="C", **lease)
        granted = await _answered(c.try_acquire_lock, acquire, until)
        if granted is None:
            return False
        acquired_at, answer = granted
        assert answer.is_leader
        held_until = acquired_at + ttl  # no use renewing later: the lease may have lapsed
        await asyncio.sleep(0.3)
        proxy.blackhole()
        try:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await c_cut.keep_alive(pb.KeepAliveRequest(client_id="C", **lease), timeout=0.5)
            await asyncio.sleep(0.5)
            k2 = pb.KeepAliveRequest(client_id="C", **lease)
            renewed = await _answered(c.keep_alive, k2, held_until, timeout=1)
            if renewed is None or not observed(KEEP_ALIVE, k2, renewed[1])["granted"]:
                return False  # slower than C's lease: no K2 to order K1 after
            renewed_at = renewed[0]
        finally:
            proxy.heal()
        while time.monotonic() < renewed_at + ttl + 1:
            with contextlib.suppress(grpc.aio.AioRpcError):  # "I do not know", recorded
                answer = await d.try_acquire_lock(pb.TryAcquireLockRequest(client_id="D", **lease))
                if answer.is_leader:
                    return True
            await asyncio.sleep(0.05)
    return True


async def _late_keep_alive(
    behind: str, direct: str, proxy: Proxy, ttl: float, workdir: Path
) -> Path:
    """Make the late keep-alive happen (see `_late_keep_alive_once`), on a fresh lock until
    its set-up succeeds, for `SETUP_BUDGET_S` at most; the file of the calls to judge."""
    until = time.monotonic() + SETUP_BUDGET_S
    attempt = 0
    while True:
        attempt += 1
        recorder = Recorder(workdir / f"calls-{attempt}.jsonl")
        try:
            if await _late_keep_alive_once(behind, direct, proxy, ttl, recorder, until):
                return recorder.path
        finally:
            recorder.close()
        if time.monotonic() >= until:
            raise AssertionError(
                f"set-up failed for {SETUP_BUDGET_S:g} s ({attempt} attempts): "
                f"C's acquire or its keep-alive on the direct instance never answered in time; "
                f"logs: {workdir}"
            )


@pytest.mark.timeout(SETUP_BUDGET_S + 120)
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
        calls = asyncio.run(
            _late_keep_alive(behind.address, direct.address, proxy, timing.ttl, tmp_path)
        )
    report = check(History.load([calls], stop=time.monotonic()))
    fault_summary(report.summary(variant, "late-keep-alive", timing.bound(fault)))
    assert not report.overlaps, "\n".join([*report.safety_problems(), f"logs: {tmp_path}"])
