"""Leases lost while `leadership()` bodies await gRPC calls (issue #14, item 4).

Three SDK clients in this process race for one lock through a real service instance,
each through a `Proxy` of its own. Every body holds the lock until it loses it, and
spends its time awaiting gRPC calls: a call to a deliberately slow endpoint on a
channel of its own (two clients), or `client.get_leader()` (one). Each round cuts the
holder off (its proxy goes blackhole) until another client leads, so the holder's
lease is lost while its body is inside such a call.

Checked: the history (every acquire, keep-alive and release, and every act) has no
overlap, no token regression, no act outside a belief; every loss reached its client
as `LeadershipLost` (a client whose task ended any other way, a bare `CancelledError`
included, fails the scenario); and every round cost its victim the lease. Each wait is
for an event (a loss, a new holder), with generous budgets only as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from quorum_quest import LeadershipLost, QuorumQuestClient, ServiceUnavailable
from tests.faults.clients import record_client_calls
from tests.faults.cluster import ServiceInstance
from tests.faults.history import Act, History, Recorder, check
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.faults

SERVICE = "faults"
TTL_S = 1.5
ROUNDS = 4
# The bodies: two await a slow call on a channel of their own, one `get_leader()`.
BODIES = ("slow-call", "get-leader", "slow-call")
SLOW_CALL_S = 0.5
SLOW_METHOD = "/qq.faults.Slow/Wait"
# Safety nets for event waits: far beyond what a round needs (about 2 ttl).
EVENT_BUDGET_S = 20.0

T = TypeVar("T")


@asynccontextmanager
async def slow_endpoint() -> AsyncIterator[str]:
    """A gRPC server of the test's own whose one method answers after `SLOW_CALL_S`."""

    async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(SLOW_CALL_S)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "qq.faults.Slow", {"Wait": grpc.unary_unary_rpc_method_handler(wait)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


class Contender:
    """One SDK client leading in a loop: its body acts between gRPC calls until the lease
    is lost, and a `LeadershipLost` sends it back to compete."""

    def __init__(
        self,
        name: str,
        domain: str,
        proxy: Proxy,
        body: str,
        slow_call: Callable[[], Awaitable[Any]],
        recorder: Recorder,
    ) -> None:
        self.name = name
        self.proxy = proxy
        self.body = body
        self.slow_call = slow_call
        self.recorder = recorder
        address = f"127.0.0.1:{proxy.port}"
        self.client = QuorumQuestClient(SERVICE, domain, TTL_S, address, client_id=name)
        record_client_calls(self.client, name, address, recorder)
        self.losses = 0

    async def call(self) -> None:
        if self.body == "slow-call":
            await self.slow_call()
            return
        with contextlib.suppress(ServiceUnavailable):  # cut off: "I do not know", and on
            await self.client.get_leader()

    async def run(self) -> None:
        while True:
            try:
                async with self.client.leadership() as lease:
                    token = lease.fencing_token
                    self.recorder.record(Act(self.name, token, time.monotonic(), checked=False))
                    while True:
                        await self.call()
                        now = time.monotonic()
                        if lease.remaining > 0:  # judged after `now`: the act lies within
                            self.recorder.record(Act(self.name, token, now))
            except LeadershipLost:
                self.losses += 1


async def until(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """The first answer of `probe` that is not None, asked every 50 ms."""
    deadline = time.monotonic() + EVENT_BUDGET_S
    while (answer := await probe()) is None:
        assert time.monotonic() < deadline, f"not within {EVENT_BUDGET_S:g} s: {what}"
        await asyncio.sleep(0.05)
    return answer


def still_running(tasks: dict[str, asyncio.Task[None]]) -> None:
    """Fail with how a contender's task ended, if one did: each should compete forever."""
    for name, task in tasks.items():
        if task.done():
            ended = "cancelled" if task.cancelled() else repr(task.exception())
            raise AssertionError(f"{name}'s task ended ({ended}) instead of competing on")


async def race(instance: ServiceInstance, recorder: Recorder) -> int:
    """Race the contenders through `ROUNDS` rounds of cutting the holder off; the losses."""
    domain = f"lock-{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        slow_address = await stack.enter_async_context(slow_endpoint())
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(slow_address))
        method = channel.unary_unary(SLOW_METHOD)
        contenders: dict[str, Contender] = {}
        for index, body in enumerate(BODIES):
            proxy = stack.enter_context(Proxy(instance.port))
            name = f"sdk{index}-{body}"
            contender = Contender(name, domain, proxy, body, lambda: method(b""), recorder)
            stack.push_async_callback(contender.client.close)
            contenders[name] = contender
        observer = QuorumQuestClient(SERVICE, domain, TTL_S, instance.address)
        stack.push_async_callback(observer.close)

        async def holder(but: str = "") -> Contender | None:
            """The contender holding the lock as the service sees it, other than `but`."""
            try:
                leader = await observer.get_leader()
            except ServiceUnavailable:
                return None
            name = leader[0] if leader is not None else ""
            return contenders.get(name) if name != but else None

        tasks = {name: asyncio.create_task(c.run()) for name, c in contenders.items()}
        try:
            victim = await until(holder, "some contender leads")
            for _ in range(ROUNDS):
                losses = victim.losses
                await asyncio.to_thread(victim.proxy.blackhole)

                async def lost(victim: Contender = victim, losses: int = losses) -> bool | None:
                    still_running(tasks)
                    return True if victim.losses > losses else None

                await until(lost, f"{victim.name}, cut off, loses its lease")
                successor = await until(partial(holder, but=victim.name), "another leads")
                await asyncio.to_thread(victim.proxy.heal)
                victim = successor
            still_running(tasks)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        return sum(contender.losses for contender in contenders.values())


@pytest.mark.timeout(120)
async def test_leases_lost_during_grpc_calls_surface_as_leadership_lost_and_never_overlap(
    fault_summary: Callable[[str], None], tmp_path: Path
) -> None:
    config = {
        "backend": {"type": "memory"},
        "store": {"ttl": 1},
        "server": {"maxTtl": 2, "stateLossGrace": 0, "healthInterval": 0.5, "shutdownGrace": 0.5},
    }
    instance = ServiceInstance("instance-0", config, tmp_path)
    recorder = Recorder(tmp_path / "calls.jsonl")
    await asyncio.to_thread(instance.start)
    try:
        losses = await race(instance, recorder)
    finally:
        recorder.close()
        await asyncio.to_thread(instance.stop)
    report = check(History.load([recorder.path], stop=time.monotonic()))
    fault_summary(report.summary("memory", "leadership-loss", TTL_S + TTL_S / 3))
    logs = f"logs: {tmp_path}"
    assert not (unsafe := report.safety_problems()), "\n".join([*unsafe, logs])
    assert not report.stale_entries, "\n".join([str(report.stale_entries[0]), logs])
    assert losses >= ROUNDS
    assert report.grants >= ROUNDS + 1
