"""Clients racing for one lock, as a process of their own: `python -m tests.faults.clients SPEC`.

SPEC is a JSON file (`ProcessSpec`). Every call each client makes, and every side
effect it takes as holder (`Act`), is recorded to the spec's `out` file. The process
touches the `ready` file once loaded, starts its clients when the `go` file appears
and stops them on SIGTERM. Being a process of their own, the clients can be paused
(SIGSTOP) while the others carry on.

Two kinds of client:

- `raw`: the raw stub, with the timing rules spelled out here. It believes it holds
  the lease until the send time of its last successful acquire or keep-alive + the
  granted ttl, judged on the monotonic clock before every act and renewal; any error
  is "I do not know" (it never extends the belief, it does not end it either) and
  makes it fail over to the next service instance. It releases after holding a
  random while, and polls every `poll` seconds while someone else leads.
- `sdk`: `QuorumQuestClient.leadership()` as an application would use it: it acts
  on entering the block, then while `lease.remaining > 0`; its stub's calls are
  recorded on their way out and in.

Beside the clients a lag probe (`probe`) records how late the process's event loop
wakes up (`Stall`), so that the checker can tell a loaded machine from a slow takeover.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from quorum_quest import LeadershipLost, QuorumQuestClient
from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.errors import QuorumQuestError
from tests.faults.history import (
    ACQUIRE,
    KEEP_ALIVE,
    PROBE_S,
    RELEASE,
    STALL_MIN_S,
    Act,
    Call,
    Recorder,
    Stall,
)

# The stub's method for each recorded operation.
STUB_METHODS = {ACQUIRE: "try_acquire_lock", KEEP_ALIVE: "keep_alive", RELEASE: "release_lock"}
# Raw clients reconnect to a restarted instance within half a second.
RAW_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)
ACT_EVERY_S = 0.1
RETRY_S = 0.05


@dataclass(frozen=True)
class Plan:
    """The lock the clients race for and their timing, in seconds."""

    service: str
    domain: str
    ttl: float
    hold: tuple[float, float]  # how long a raw or SDK client holds before releasing
    poll: tuple[float, float]  # a raw client's pause between acquire attempts
    rest: tuple[float, float] = (0.05, 0.3)  # pause after releasing or losing the lock

    @property
    def interval(self) -> float:
        """Keep-alive interval: ttl / 3, as the SDK's default."""
        return self.ttl / 3

    @property
    def call_timeout(self) -> float:
        """Deadline of an acquire or release; a keep-alive gets at most `interval`."""
        return 2 * self.interval


@dataclass(frozen=True)
class ClientSpec:
    """One client: `kind` raw or sdk; `addresses` the service instances, preferred first."""

    id: str
    kind: str
    addresses: tuple[str, ...]

    @property
    def target(self) -> str:
        """One gRPC target naming every instance (pick-first: the first that answers)."""
        if len(self.addresses) == 1:
            return self.addresses[0]
        return "ipv4:" + ",".join(self.addresses)


@dataclass(frozen=True)
class ProcessSpec:
    """One client process: its files (`out` for events, `ready` and `go` to start in step
    with the test), the random seed, the plan and its clients."""

    out: str
    ready: str
    go: str
    seed: int
    plan: Plan
    clients: tuple[ClientSpec, ...]

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str) -> ProcessSpec:
        raw = json.loads(text)
        plan = raw.pop("plan")
        plan = Plan(**{key: tuple(v) if isinstance(v, list) else v for key, v in plan.items()})
        clients = tuple(
            ClientSpec(c["id"], c["kind"], tuple(c["addresses"])) for c in raw.pop("clients")
        )
        return cls(plan=plan, clients=clients, **raw)


def _seconds(duration: Any) -> float:
    """A duration as the raw stub (timedelta or None) or the SDK (a Duration message) has it."""
    if duration is None:
        return 0.0
    if isinstance(duration, timedelta):
        return duration.total_seconds()
    return duration.seconds + duration.nanos / 1e9


def observed(op: str, request: Any, response: Any) -> dict[str, Any]:
    """What an answer tells, as `Call` fields: granted, token, ttl and waited (seconds)."""
    if op == ACQUIRE:
        return {
            "granted": response.is_leader,
            "token": response.fencing_token,
            "ttl": _seconds(response.lease_length),
            "waited": _seconds(response.waited),
        }
    if op == KEEP_ALIVE:
        ttl = _seconds(response.lease_length) or -1.0
        return {"granted": ttl > 0, "token": response.fencing_token, "ttl": ttl}
    return {"granted": response.released, "token": request.fencing_token}


class Recorded:
    """A stub method that records each call it makes: send and receive time, answer."""

    def __init__(self, method: Any, op: str, client: str, via: str, recorder: Recorder) -> None:
        self._method = method
        self._op = op
        self._client = client
        self._via = via
        self._recorder = recorder

    async def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None
    ) -> Any:
        send = time.monotonic()
        try:
            extra = {} if metadata is None else {"metadata": metadata}
            response = await self._method(request, timeout=timeout, **extra)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            # Unanswered, or abandoned by a cancelled caller: the request may still have
            # been served. A release names its lease whether it was answered or not.
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "CANCELLED"
            token = request.fencing_token if self._op == RELEASE else 0
            self._recorder.record(
                Call(
                    self._client,
                    self._op,
                    send,
                    time.monotonic(),
                    False,
                    code=code,
                    token=token,
                    via=self._via,
                )
            )
            raise
        answer = observed(self._op, request, response)
        self._recorder.record(
            Call(self._client, self._op, send, time.monotonic(), True, via=self._via, **answer)
        )
        return response


def record_calls(stub: LeaderElectionStub, client: str, via: str, recorder: Recorder) -> None:
    """Make `stub` (connected to `via`) record every acquire, keep-alive and release."""
    for op, attribute in STUB_METHODS.items():
        setattr(stub, attribute, Recorded(getattr(stub, attribute), op, client, via, recorder))


class RecordedClientCalls:
    """An SDK client's `_call`, through which its every lock call goes (over its session
    or unary), recording each acquire, keep-alive and release as `Recorded` does."""

    OPS = {attribute: op for op, attribute in STUB_METHODS.items()}

    def __init__(self, call: Any, client: str, via: str, recorder: Recorder) -> None:
        self._call = call
        self._client = client
        self._via = via
        self._recorder = recorder

    async def __call__(self, method: str, request: Any, timeout: float | None = None) -> Any:
        op = self.OPS.get(method)
        if op is None:
            return await self._call(method, request, timeout)
        send = time.monotonic()
        try:
            response = await self._call(method, request, timeout)
        except (QuorumQuestError, asyncio.CancelledError) as exc:
            # As `Recorded`: any failure counts as unanswered, the request may have run.
            code = getattr(exc, "code", None)
            self._recorder.record(
                Call(
                    self._client,
                    op,
                    send,
                    time.monotonic(),
                    False,
                    code=code.name if isinstance(code, grpc.StatusCode) else type(exc).__name__,
                    token=request.fencing_token if op == RELEASE else 0,
                    via=self._via,
                )
            )
            raise
        answer = observed(op, request, response)
        self._recorder.record(
            Call(self._client, op, send, time.monotonic(), True, via=self._via, **answer)
        )
        return response


def record_client_calls(client: QuorumQuestClient, name: str, via: str, recorder: Recorder) -> None:
    """Make the SDK `client` (connected to `via`) record every acquire, keep-alive and
    release it makes, over its session or unary."""
    client._call = RecordedClientCalls(client._call, name, via, recorder)  # type: ignore[method-assign]


class RawClient:
    """A raw-stub client that fails over between instances on any error."""

    def __init__(
        self, spec: ClientSpec, plan: Plan, recorder: Recorder, rng: random.Random
    ) -> None:
        self.id = spec.id
        self.plan = plan
        self.recorder = recorder
        self.rng = rng
        self.channels = [
            grpc.aio.insecure_channel(address, options=RAW_CHANNEL_OPTIONS)
            for address in spec.addresses
        ]
        self.stubs = [LeaderElectionStub(channel) for channel in self.channels]
        for stub, address in zip(self.stubs, spec.addresses, strict=True):
            record_calls(stub, self.id, address, recorder)
        self.current = 0
        self.ttl_fields = {"ttl": max(1, math.ceil(plan.ttl)), "ttl_ms": round(plan.ttl * 1000)}

    async def _call(self, op: str, request: Any, timeout: float) -> Any | None:
        """The answer, or None for "I do not know" (then the next instance is tried next)."""
        try:
            return await getattr(self.stubs[self.current], STUB_METHODS[op])(
                request, timeout=timeout
            )
        except grpc.aio.AioRpcError:
            self.current = (self.current + 1) % len(self.stubs)
            return None

    async def run(self) -> None:
        plan = self.plan
        while True:
            send = time.monotonic()
            request = pb.TryAcquireLockRequest(
                service=plan.service, domain=plan.domain, client_id=self.id, **self.ttl_fields
            )
            response = await self._call(ACQUIRE, request, plan.call_timeout)
            if response is not None and response.is_leader:
                deadline = send + _seconds(response.lease_length)
                if time.monotonic() < deadline:  # a grant answered too late is not believed
                    await self._hold(response.fencing_token, send, deadline)
                    await asyncio.sleep(self.rng.uniform(*plan.rest))
                    continue
            await asyncio.sleep(self.rng.uniform(*plan.poll))

    async def _hold(self, token: int, granted_at: float, deadline: float) -> None:
        """Act as holder of `token` until the release time or the belief runs out."""
        plan = self.plan
        release_at = time.monotonic() + self.rng.uniform(*plan.hold)
        renew_at = granted_at + plan.interval
        while True:
            now = time.monotonic()
            if now >= deadline:
                return  # the belief ran out: not one more act
            if now >= release_at:
                request = pb.ReleaseLockRequest(
                    service=plan.service, domain=plan.domain, client_id=self.id, fencing_token=token
                )
                await self._call(RELEASE, request, plan.call_timeout)
                return
            if now >= renew_at:
                renewed = await self._renew(token, now, deadline)
                if renewed is None:
                    renew_at = time.monotonic() + RETRY_S
                elif renewed == 0.0:
                    return  # refused, or answered after the deadline
                else:
                    deadline, renew_at = renewed, now + plan.interval
                continue
            self.recorder.record(Act(self.id, token, now))
            await asyncio.sleep(min(ACT_EVERY_S, renew_at - now, release_at - now, deadline - now))

    async def _renew(self, token: int, send: float, deadline: float) -> float | None:
        """The new deadline; 0.0 when the lease is lost; None when unknown (retry)."""
        plan = self.plan
        request = pb.KeepAliveRequest(
            service=plan.service, domain=plan.domain, client_id=self.id, **self.ttl_fields
        )
        response = await self._call(KEEP_ALIVE, request, min(plan.interval, deadline - send))
        if response is None:
            return None
        answer = observed(KEEP_ALIVE, request, response)
        if not answer["granted"] or answer["token"] != token or time.monotonic() >= deadline:
            return 0.0
        return send + answer["ttl"]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class SdkClient:
    """`QuorumQuestClient.leadership()` in a loop, its calls recorded."""

    def __init__(
        self, spec: ClientSpec, plan: Plan, recorder: Recorder, rng: random.Random
    ) -> None:
        self.id = spec.id
        self.plan = plan
        self.recorder = recorder
        self.rng = rng
        self.client = QuorumQuestClient(
            plan.service, plan.domain, ttl=plan.ttl, address=spec.target, client_id=spec.id
        )
        record_client_calls(self.client, self.id, spec.target, recorder)

    async def run(self) -> None:
        while True:
            try:
                async with self.client.leadership() as lease:
                    # Leader work on entry, unchecked, as the README shows it; then only
                    # while the lease is still valid.
                    now = time.monotonic()
                    self.recorder.record(Act(self.id, lease.fencing_token, now, checked=False))
                    release_at = now + self.rng.uniform(*self.plan.hold)
                    await asyncio.sleep(ACT_EVERY_S)
                    while (now := time.monotonic()) < release_at:
                        if lease.remaining > 0:  # judged after `now`: the act lies within
                            self.recorder.record(Act(self.id, lease.fencing_token, now))
                        await asyncio.sleep(min(ACT_EVERY_S, release_at - now))
            except LeadershipLost:
                pass
            await asyncio.sleep(self.rng.uniform(*self.plan.rest))

    async def close(self) -> None:
        await self.client.close()


KINDS = {"raw": RawClient, "sdk": SdkClient}


async def probe(recorder: Recorder, process: str, clients: tuple[str, ...]) -> None:
    """Sleep `PROBE_S` at a time; record each wake-up later than `STALL_MIN_S` as a
    `Stall`: the process (its event loop, or the CPU) was not free to run meanwhile."""
    while True:
        due = time.monotonic() + PROBE_S
        await asyncio.sleep(PROBE_S)
        woke = time.monotonic()
        if woke - due >= STALL_MIN_S:
            recorder.record(Stall(process, due, woke, clients))


async def serve(spec: ProcessSpec) -> None:
    """Run the clients from `go` until SIGTERM; a client that fails ends the process with
    its error."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    Path(spec.ready).touch()
    while not Path(spec.go).exists():
        if stop.is_set():
            return
        await asyncio.sleep(0.01)
    recorder = Recorder(Path(spec.out))
    rng = random.Random(spec.seed)
    clients = [KINDS[client.kind](client, spec.plan, recorder, rng) for client in spec.clients]
    tasks = [asyncio.create_task(client.run()) for client in clients]
    ids = tuple(client.id for client in spec.clients)
    lag = asyncio.create_task(probe(recorder, Path(spec.out).stem, ids))
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in [stopping, lag, *tasks]:
        task.cancel()
    await asyncio.gather(stopping, lag, *tasks, return_exceptions=True)
    for client in clients:
        await client.close()
    recorder.close()
    for task in done - {stopping}:
        task.result()  # a client's own failure: raised, so the test sees it


if __name__ == "__main__":
    asyncio.run(serve(ProcessSpec.loads(Path(sys.argv[1]).read_text())))
