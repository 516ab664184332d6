"""The async Python SDK: `QuorumQuestClient`, its `leadership()` and `leaderships()`."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import grpc
from anyio.abc import TaskGroup, TaskStatus

from quorum_quest._rpc import SERVICE_NAME, LeaderElectionStub, wire
from quorum_quest.client import watch as _watch
from quorum_quest.client.connection import (
    ClientTLS,
    bearer_metadata,
    open_channel,
    token_from_environment,
)
from quorum_quest.client.lease import EXPIRED, RELEASED, Lease, LeaseKeeper, keep_alive
from quorum_quest.client.session import OPERATIONS, Session, SessionUnsupported, leave, session_for
from quorum_quest.client.status import rpc_error
from quorum_quest.client.tracing import client_interceptors
from quorum_quest.errors import (
    AccessRefused,
    InvalidArgument,
    LeadershipLost,
    QuotaExceeded,
    ServiceUnavailable,
)

# A library inside other programs: silent unless the application configures logging.
logger = logging.getLogger("quorum_quest.client")
logger.addHandler(logging.NullHandler())

# Like the clients generated from the original contract: ping every 10 s, also idle.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)
# Renewals wait for the channel to (re)connect, within their deadline, instead of
# failing at once while it is down: a renewal reaches a restarted service as it is back.
RENEWALS_WAIT_FOR_READY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": SERVICE_NAME, "method": "KeepAlive"},
                    {"service": SERVICE_NAME, "method": "KeepAliveMany"},
                ],
                "waitForReady": True,
            }
        ]
    }
)

LeaseCallback = Callable[[Lease], "Awaitable[None] | None"]
# A lock named for `leaderships()`: a domain of the client's service, or (service, domain).
LockName = str | tuple[str, str]

# Renewals of a LeaseSet: locks per KeepAliveMany call, calls in flight, and how close
# together two leases' renewals must fall to share a call.
RENEW_BATCH = 1_000
RENEW_CONCURRENCY = 4
RENEW_COALESCE_S = 0.5
# TryAcquireLock / ReleaseLock calls a LeaseSet has in flight at once.
SET_CALL_CONCURRENCY = 64
# How long one acquire may ask the service to wait for a release (TryAcquire wait_ms).
WAIT_FOR_RELEASE_S = 5.0


@dataclass(frozen=True)
class Callbacks:
    """Called (sync or async) when this client becomes leader and when it stops being one;
    `on_new_leader` with each change of leader, only inside `client.watching()`."""

    on_leader_elected: LeaseCallback | None = None
    on_leader_lost: LeaseCallback | None = None
    on_new_leader: _watch.NewLeaderCallback | None = None


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _channel_options(ttl: float) -> tuple[tuple[str, int | str], ...]:
    """Options of a channel renewing leases of `ttl` seconds.

    gRPC's default reconnect backoff (1 s, then 1.6 times longer per failed attempt, up
    to 120 s) can leave a channel refusing every call for seconds after a restarted
    service is back: long enough to lose a lease to a restart of a second or two. Here a
    channel tries to reconnect every tenth of a lease (between 0.1 and 1 s).
    (`grpc.min_reconnect_backoff_ms` is no backoff but the time one connection attempt
    may take, 20 s by default: it stays, as a slow handshake is no reason to give up.)
    """
    backoff_ms = min(1_000, max(100, round(ttl * 100)))
    return (
        *CHANNEL_OPTIONS,
        ("grpc.initial_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ("grpc.service_config", RENEWALS_WAIT_FOR_READY),
    )


def _cancelled_from_outside(task: asyncio.Task[Any], cancelling_before: int) -> bool:
    """Whether `task` has been cancelled from outside since it was cancelled
    `cancelling_before` times: by `Task.cancel()` or by a cancel scope around it."""
    return task.cancelling() > cancelling_before or anyio.current_effective_deadline() == -math.inf


async def _answer(call: Awaitable[Any]) -> Any:
    """The answer to `call` (a grpc.aio call, or any awaitable of one's answer, such as
    a wrapped stub method); a caller cancelled meanwhile cancels the call.

    The caller is woken by a future of its own, so its cancellation arrives as the
    CancelledError it was cancelled with: awaiting the call itself would raise grpc's
    own, bare CancelledError, which anyio's cancel scopes (`fail_after`, task groups)
    do not recognise as theirs and let escape.
    """
    if not isinstance(call, grpc.aio.Call):
        call = asyncio.ensure_future(call)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake(_: object) -> None:
        if not done.done():
            done.set_result(None)

    call.add_done_callback(wake)
    try:
        await done
    except asyncio.CancelledError:
        call.cancel()
        raise
    return await call


def _duration_s(duration: Any) -> float:
    """A `google.protobuf.Duration` message in seconds (an unset one is 0)."""
    return float(duration.seconds + duration.nanos / 1e9)


# What a call that must not fail its caller (a release on the way out) logs instead.
BEST_EFFORT_FAILURES = (ServiceUnavailable, InvalidArgument, AccessRefused)


class QuorumQuestClient:
    """A client of one lock, (service, domain), identified by `client_id`.

    `async with client.leadership() as lease:` is the idiomatic use: it waits to
    lead, keeps the lease alive, cancels the body the moment the lease can no longer
    be guaranteed (raising `LeadershipLost`), and releases on exit. The lower-level
    calls mirror the Go client: `try_acquire_lock`, `start_keep_alive`,
    `stop_keep_alive`, `release_lock`, `close`.
    """

    def __init__(
        self,
        service: str,
        domain: str,
        ttl: float | timedelta,
        address: str,
        *,
        client_id: str | None = None,
        callbacks: Callbacks | None = None,
        keep_alive_interval: float | timedelta | None = None,
        rpc_timeout: float | timedelta | None = None,
        safety_margin: float | timedelta | None = None,
        tls: ClientTLS | bool | None = None,
        token: str | None = None,
        session: bool = True,
    ) -> None:
        """`tls`: a `ClientTLS`, True for TLS verified against the system's roots, False
        for plaintext; `token`: a bearer token sent with every call ("" for none). Left
        at None, each comes from the environment (`QUORUMQUEST_TLS*`,
        `QUORUMQUEST_TOKEN`, `QUORUMQUEST_TOKEN_FILE`; see `quorum_quest.client.connection`),
        and is plaintext without a token when that sets nothing.

        `session`: send acquires, renewals, releases and leader queries over the
        `Session` stream that every client of this address and credentials in the
        event loop shares (`quorum_quest.client.session`), far cheaper than a unary
        call each; against a service without it, and with False, unary calls."""
        self.service = service
        self.domain = domain
        self.address = address
        self.client_id = client_id or str(uuid.uuid4())
        self.callbacks = callbacks or Callbacks()
        self.ttl = _seconds(ttl)
        if self.ttl <= 0:
            raise InvalidArgument("ttl", "must be positive")
        self.safety_margin = (
            min(self.ttl / 10, 1.0) if safety_margin is None else _seconds(safety_margin)
        )
        self.keep_alive_interval = (
            self.ttl / 3 if keep_alive_interval is None else _seconds(keep_alive_interval)
        )
        self.rpc_timeout = (
            min(self.keep_alive_interval, 5.0) if rpc_timeout is None else _seconds(rpc_timeout)
        )
        # Timing knobs are checked together, as a renewal must land inside the lease.
        if not 0 <= self.safety_margin < self.ttl / 2:
            raise InvalidArgument("safety_margin", "must be at least 0 and below ttl / 2")
        if not 0 < self.keep_alive_interval < self.ttl - self.safety_margin:
            raise InvalidArgument(
                "keep_alive_interval", "must be positive and below ttl - safety_margin"
            )
        if self.rpc_timeout <= 0:
            raise InvalidArgument("rpc_timeout", "must be positive")
        if tls is None:
            tls = ClientTLS.from_environment()
        self.tls = ClientTLS() if tls is True else tls or None
        if self.tls is not None:
            self.tls.credentials()  # a missing or unreadable file is named here and now
        self._token = token_from_environment() if token is None else token
        self._metadata = bearer_metadata(self._token)
        self._channel: grpc.aio.Channel | None = None
        self._stub: LeaderElectionStub | None = None
        self._use_session = session
        self._session: Session | None = None
        self._lease: Lease | None = None
        self._holder_hint = 0.0  # seconds left of the holder's lease, as last answered
        self._service_waited = False  # whether the service waited before its last refusal
        # Whether the last acquire of this client's lock got no answer: it may have
        # been granted all the same.
        self._grant_in_doubt = False
        # (service, domain) -> token of a lease whose release got no answer
        self._abandoned: dict[tuple[str, str], int] = {}
        self._keep_alive_task: asyncio.Task[None] | None = None

    # -- connection -------------------------------------------------------------

    @property
    def stub(self) -> LeaderElectionStub:
        """The client's stub, speaking `quorum_quest._rpc.wire` messages; the channel
        opens on first use."""
        if self._stub is None:
            self._channel = self._open_channel()
            self._stub = LeaderElectionStub(self._channel, wire)
        return self._stub

    def _open_channel(self) -> grpc.aio.Channel:
        # Client spans when the application has configured OpenTelemetry (`tracing`).
        interceptors = client_interceptors()
        return open_channel(
            self.address, self.tls, self._token, _channel_options(self.ttl), interceptors
        )

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """The answer of the stub's `method` on `request`: over the session when it
        carries that method, else as a unary call."""
        timeout = timeout or self.rpc_timeout
        if self._use_session and method in OPERATIONS:
            if self._session is None:
                key = (self.address, self.tls, self._token, _channel_options(self.ttl))
                self._session = session_for(key, self._open_channel, self._metadata)
            try:
                return await self._session.call(method, request, timeout)
            except SessionUnsupported:
                self._use_session = False  # a service of the original contract
        try:
            return await _answer(
                getattr(self.stub, method)(request, timeout=timeout, metadata=self._metadata)
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from None

    async def __aenter__(self) -> QuorumQuestClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop keeping the lease alive, release it if held, and close the connection."""
        self.stop_keep_alive()
        if self._lease is not None:
            try:
                await self.release_lock()
            except BEST_EFFORT_FAILURES as exc:
                logger.warning(
                    "could not release %s/%s on close: %s", self.service, self.domain, exc
                )
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
        session, self._session = self._session, None
        if session is not None:
            await leave(session)

    # -- state ------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        """The lease this client holds, or None."""
        return self._lease if self._lease is not None and self._lease.is_valid else None

    @property
    def is_leader(self) -> bool:
        return self.lease is not None

    @property
    def remaining_lease(self) -> timedelta:
        """How long the current lease is still guaranteed (zero when not leader)."""
        return timedelta(seconds=self._lease.remaining if self._lease else 0.0)

    async def _notify(self, callback: LeaseCallback | None, lease: Lease) -> None:
        if callback is None:
            return
        try:
            result = callback(lease)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception(
                "leadership callback %s failed", getattr(callback, "__name__", callback)
            )

    # -- the Go client's calls ----------------------------------------------------

    async def try_acquire_lock(self) -> bool:
        """Acquire the lock if free (or refresh ours); True when this client leads."""
        held = self._lease
        if not await self._try_acquire(0.0):
            return False
        lease = self._lease
        assert lease is not None
        if lease is not held:
            await self._notify(self.callbacks.on_leader_elected, lease)
        return True

    async def _try_acquire(self, wait: float) -> bool:
        """Acquire the lock if free (or refresh ours), letting the service wait up to
        `wait` s for a release; True when this client leads (a new grant is a new
        `self._lease`)."""
        self._grant_in_doubt = True  # until the answer is in
        try:
            response, sent_at = await self._grant(self.service, self.domain, wait)
        except (AccessRefused, InvalidArgument):
            self._grant_in_doubt = False  # refused: nothing was granted
            raise
        self._grant_in_doubt = False
        if not response.is_leader:
            await self._drop_lease("another client holds the lock")
            self._holder_hint = _duration_s(response.lease_length)
            self._service_waited = _duration_s(response.waited) > 0
            return False
        granted = _duration_s(response.lease_length)
        lease = self._lease
        if (
            lease is not None
            and lease.end_reason is None
            and lease.fencing_token == response.fencing_token
        ):
            lease._renewed(sent_at, granted, self.safety_margin, response.fencing_token)
            return True
        # The new lease is recorded before anything is awaited, so that a caller
        # cancelled from here on gives it back (`_give_back`).
        replaced = self._lease
        self._lease = self._new_lease(self.service, self.domain, response, sent_at)
        if replaced is not None:
            replaced._end("replaced by a new grant")
            await self._notify(self.callbacks.on_leader_lost, replaced)
        return True

    def _new_lease(self, service: str, domain: str, response: Any, sent_at: float) -> Lease:
        """The lease a grant (`wire.TryAcquireLockResponse`) sent at `sent_at` gives."""
        granted = _duration_s(response.lease_length)
        return Lease(
            service,
            domain,
            self.client_id,
            response.fencing_token,
            granted,
            sent_at + granted - self.safety_margin,
        )

    async def _grant(self, service: str, domain: str, wait: float = 0.0) -> tuple[Any, float]:
        """Try to acquire (service, domain): the answer and the earliest time (monotonic)
        its lease can have begun: the send time, plus what the service says it waited."""
        sent_at = time.monotonic()
        response = await self._acquire(service, domain, wait)
        sent_at += _duration_s(response.waited)
        if response.is_leader and response.fencing_token == self._abandoned.get((service, domain)):
            # The service still holds a lease this client tried to release without an
            # answer. Never resume it as a new leadership: release it for sure, then
            # acquire afresh, so each grant this client acts on has a larger token.
            await self._release(service, domain, response.fencing_token)
            del self._abandoned[service, domain]
            sent_at = time.monotonic()
            response = await self._acquire(service, domain)
        granted = _duration_s(response.lease_length)
        if response.is_leader and sent_at + granted - self.safety_margin <= time.monotonic():
            # The answer came too late to act on (this process was paused, or the call
            # was slow): give the lease back at once instead of blocking the lock unused.
            logger.warning(
                "grant of %s/%s arrived after its lease ended; releasing it", service, domain
            )
            try:
                await self._release(service, domain, response.fencing_token)
            except BEST_EFFORT_FAILURES:
                self._abandoned[service, domain] = response.fencing_token
            response = wire.TryAcquireLockResponse(is_leader=False)
        return response, sent_at

    async def _acquire(self, service: str, domain: str, wait: float = 0.0) -> Any:
        return await self._call(
            "try_acquire_lock",
            wire.TryAcquireLockRequest(
                service=service,
                domain=domain,
                client_id=self.client_id,
                ttl=max(1, math.ceil(self.ttl)),
                ttl_ms=max(1, round(self.ttl * 1000)),
                wait_ms=round(wait * 1000),
            ),
            timeout=wait + self.rpc_timeout,
        )

    async def _renew(self, timeout: float) -> tuple[float, int] | None:
        response = await self._call(
            "keep_alive",
            wire.KeepAliveRequest(
                service=self.service,
                domain=self.domain,
                client_id=self.client_id,
                ttl=max(1, math.ceil(self.ttl)),
                ttl_ms=max(1, round(self.ttl * 1000)),
            ),
            timeout=timeout,
        )
        granted = _duration_s(response.lease_length)
        return (granted, response.fencing_token) if granted > 0 else None

    async def _renew_many(
        self, leases: Sequence[Lease], timeout: float
    ) -> list[tuple[float, int] | None]:
        response = await self._call(
            "keep_alive_many",
            wire.KeepAliveManyRequest(
                client_id=self.client_id,
                locks=[{"service": lease.service, "domain": lease.domain} for lease in leases],
                ttl=max(1, math.ceil(self.ttl)),
                ttl_ms=max(1, round(self.ttl * 1000)),
            ),
            timeout=timeout,
        )
        tokens = response.fencing_tokens
        if len(tokens) != len(leases):
            raise ServiceUnavailable(
                f"KeepAliveMany answered {len(tokens)} results for {len(leases)} locks"
            )
        granted = _duration_s(response.lease_length)
        if granted <= 0:
            return [None] * len(leases)
        return [(granted, token) if token else None for token in tokens]

    async def _keep_until_lost(self, lease: Lease) -> str:
        return await keep_alive(
            lease,
            self._renew,
            interval=self.keep_alive_interval,
            margin=self.safety_margin,
            rpc_timeout=self.rpc_timeout,
        )

    async def _drop_lease(self, reason: str) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease._end(reason)
            await self._notify(self.callbacks.on_leader_lost, lease)

    async def start_keep_alive(self) -> None:
        """Keep the held lease alive in the background until stopped, released or lost."""
        lease = self._lease
        if lease is None:
            raise LeadershipLost(f"{self.client_id} does not hold {self.service}/{self.domain}")
        self.stop_keep_alive()

        async def run() -> None:
            reason = await self._keep_until_lost(lease)
            logger.warning("lost %s/%s: %s", self.service, self.domain, reason)
            if self._lease is lease:
                await self._drop_lease(reason)

        self._keep_alive_task = asyncio.get_running_loop().create_task(run())

    def stop_keep_alive(self) -> None:
        task, self._keep_alive_task = self._keep_alive_task, None
        if task is not None:
            task.cancel()

    async def release_lock(self) -> bool:
        """Release the lock if this client holds it; True when this call released it.

        The lease ends for this client either way: if the service gives no answer, the
        client stops acting as holder, and should it later be handed the same lease
        back, it releases that first and acquires a new one.
        """
        self.stop_keep_alive()
        lease = self._lease
        try:
            token = lease.fencing_token if lease is not None else 0
            released = await self._release_lease(self.service, self.domain, token)
        finally:
            await self._drop_lease(RELEASED)
        return released

    async def _release_lease(self, service: str, domain: str, token: int) -> bool:
        """Release the lease with fencing token `token` (> 0; 0: any lease of this client)
        on (service, domain); remember it as abandoned if that got no answer."""
        try:
            released = await self._release(service, domain, token)
        except BEST_EFFORT_FAILURES:
            if token:
                self._abandoned[service, domain] = token
            raise
        if token and self._abandoned.get((service, domain)) == token:
            del self._abandoned[service, domain]
        return released

    async def _release(self, service: str, domain: str, token: int = 0) -> bool:
        """Release (service, domain); only the lease with fencing token `token`, when > 0."""
        response = await self._call(
            "release_lock",
            wire.ReleaseLockRequest(
                service=service, domain=domain, client_id=self.client_id, fencing_token=token
            ),
        )
        return bool(response.released)

    async def get_leader(self) -> tuple[str, int] | None:
        """The current holder's client_id and fencing token, or None when the lock is free."""
        response = await self._call(
            "get_leader", wire.GetLeaderRequest(service=self.service, domain=self.domain)
        )
        return (response.client_id, response.fencing_token) if response.has_leader else None

    # -- leadership -----------------------------------------------------------------

    async def wait_for_leadership(self, timeout: float | None = None) -> Lease:
        """Try to acquire until this client leads, call `on_leader_elected`, return the lease.

        Raises `TimeoutError` after `timeout` seconds, the callback included. A grant this
        call does not hand to its caller (the timeout or a cancellation struck while the
        acquire was answered or the callback ran) is released, best effort, rather than
        left to block the lock for a whole ttl.
        """
        held = self._lease  # a lease held before this call stays the caller's
        try:
            with anyio.fail_after(timeout):
                lease = await self._acquire_until_leading()
                if lease is not held:
                    await self._notify(self.callbacks.on_leader_elected, lease)
        except BaseException:
            await self._give_back(held)
            raise
        return lease

    async def _acquire_until_leading(self) -> Lease:
        """Try to acquire (with backoff and jitter) until this client leads; its lease."""
        delay = 0.05
        while True:
            try:
                # The service answers as soon as the lock is released or its
                # holder's lease ends, or after WAIT_FOR_RELEASE_S.
                if await self._try_acquire(WAIT_FOR_RELEASE_S):
                    assert self._lease is not None
                    return self._lease
                # Poll faster as the holder's lease nears its end, never busier than 50 ms.
                hint = self._holder_hint or delay
                pause = 0.0 if self._service_waited else max(0.05, min(delay, hint))
            except (ServiceUnavailable, QuotaExceeded) as exc:
                # An outage or a quota (calls per second, leases held) is waited out;
                # a refusal for credentials or rules is the caller's to see at once.
                logger.warning("waiting for %s/%s: %s", self.service, self.domain, exc)
                pause = delay
            await anyio.sleep(pause * random.uniform(0.5, 1.0))
            delay = min(delay * 2, max(0.05, self.keep_alive_interval))

    async def _give_back(self, held: Lease | None) -> None:
        """Release what a wait for leadership that ends without handing over a lease may
        have been granted: the lease it made, or, when its last acquire got no answer,
        whatever lease the service says this client holds. `held` (a lease from before
        the wait) is kept. Best effort: a failure is logged."""
        with anyio.CancelScope(shield=True):
            try:
                if self._lease is not None:
                    if self._lease is not held:
                        await self.release_lock()
                elif self._grant_in_doubt:
                    leader = await self.get_leader()
                    if leader is not None and leader[0] == self.client_id:
                        await self._release_lease(self.service, self.domain, leader[1])
            except BEST_EFFORT_FAILURES as exc:
                logger.warning(
                    "could not release the grant of %s/%s: %s", self.service, self.domain, exc
                )

    @asynccontextmanager
    async def leadership(self, timeout: float | None = None) -> AsyncIterator[Lease]:
        """Lead for the duration of the block.

        Waits (with backoff and jitter) until this client holds the lock, or raises
        `TimeoutError` after `timeout` seconds. From the grant on, the lease is kept
        alive in the background, while `on_leader_elected` runs too, and the body starts
        only on a lease that is still valid. If the lease cannot be renewed before it
        would expire, the callback or the body is cancelled and `LeadershipLost` is
        raised, whatever it awaited (a gRPC call included); a cancellation from outside
        stays a cancellation. The lock is released on exit, and so is a grant that a
        timeout or a cancellation kept from reaching the body.
        """
        held = self._lease
        try:
            with anyio.fail_after(timeout):
                lease = await self._acquire_until_leading()
        except BaseException:
            await self._give_back(held)
            raise
        self.stop_keep_alive()
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        lost: LeadershipLost | None = None
        try:
            try:
                async with anyio.create_task_group() as guard:

                    async def keep() -> None:
                        nonlocal lost
                        reason = await self._keep_until_lost(lease)
                        lost = LeadershipLost(f"lost {self.service}/{self.domain}: {reason}")
                        guard.cancel_scope.cancel()

                    guard.start_soon(keep)
                    try:
                        if lease is not held:
                            await self._notify(self.callbacks.on_leader_elected, lease)
                        if lease.is_valid:
                            yield lease
                        else:  # ran out before the keep-alive noticed: never enter the body
                            reason = lease.end_reason or EXPIRED
                            lost = LeadershipLost(f"lost {self.service}/{self.domain}: {reason}")
                    finally:
                        guard.cancel_scope.cancel()
            except ExceptionGroup as errors:
                # The body's error (or the keep-alive's) as itself, not in a group.
                if len(errors.exceptions) == 1:
                    raise errors.exceptions[0] from None
                raise
        except asyncio.CancelledError:
            # A gRPC call cancelled by the keep-alive's cancel scope raises grpc's own
            # CancelledError, which anyio does not recognise as the scope's: the loss
            # all the same, unless the caller was cancelled from outside too.
            if lost is None or _cancelled_from_outside(task, cancelling):
                raise
        finally:
            with anyio.CancelScope(shield=True):
                if lost is None:
                    try:
                        await self.release_lock()
                    except BEST_EFFORT_FAILURES as exc:
                        logger.warning(
                            "could not release %s/%s: %s", self.service, self.domain, exc
                        )
                elif self._lease is lease:
                    await self._drop_lease(lease.end_reason or EXPIRED)
        if lost is not None:
            raise lost

    @asynccontextmanager
    async def leaderships(
        self, locks: Iterable[LockName], *, callbacks: Callbacks | None = None
    ) -> AsyncIterator[LeaseSet]:
        """Hold as many of `locks` as are free, all kept alive together, for the block.

        A lock is a domain of this client's service, or a `(service, domain)` pair.
        On entry each lock is tried once; `await leases.try_acquire()` tries the
        missing ones again. Every held lease is renewed by one background loop with
        batched `KeepAliveMany` calls, with the guarantees of `leadership()` for each
        lease on its own. A lost lease ends (`lease.wait_ended()`, `is_valid` turns
        false, `callbacks.on_leader_lost` is called) and leaves the set; the others
        and the block go on. Every lease still held is released on exit.
        """
        try:
            async with anyio.create_task_group() as group:
                leases = LeaseSet(self, locks, callbacks or Callbacks(), group)
                try:
                    # Renewing from the first grant on: acquiring thousands takes a while.
                    await group.start(leases._keep)
                    await leases.try_acquire()
                    yield leases
                finally:
                    with anyio.CancelScope(shield=True):
                        await leases._close()
        except ExceptionGroup as errors:
            # The body's error, or the keeper's, as itself rather than in a group.
            if len(errors.exceptions) == 1:
                raise errors.exceptions[0] from None
            raise

    # -- watching who leads (client/watch.py) ---------------------------------------

    def watch(
        self, *locks: LockName, service: str | None = None
    ) -> AsyncIterator[_watch.LeaderChange]:
        """`async for change in client.watch():` the leader of this client's lock now,
        then each change; or of `locks` (domains of this client's service, or (service,
        domain) pairs) and of every lock of `service`. Resumes by itself when the stream
        breaks, missing nothing (see `quorum_quest.client.watch`)."""
        return _watch.watch_leaders(self, locks, service)

    def watching(self, *locks: LockName, service: str | None = None) -> _watch.Watching:
        """`async with client.watching():` call `callbacks.on_new_leader` with each change
        of leader of what `watch()` would follow, for as long as the block runs."""
        return _watch.following_leaders(self, locks, service)


def _lock_name(service: str, name: LockName) -> tuple[str, str]:
    return (service, name) if isinstance(name, str) else (name[0], name[1])


class LeaseSet:
    """The leases one client holds on a set of locks, made by `client.leaderships()`.

    Iterating gives the leases held now; `get(lock)` one of them or None. Every
    lease is renewed by one `LeaseKeeper` (batched `KeepAliveMany` calls), so one
    client object can lead thousands of locks with a handful of calls per interval.
    """

    def __init__(
        self,
        client: QuorumQuestClient,
        locks: Iterable[LockName],
        callbacks: Callbacks,
        group: TaskGroup,
    ) -> None:
        self._client = client
        self._locks = list(dict.fromkeys(_lock_name(client.service, lock) for lock in locks))
        self._callbacks = callbacks
        self._group = group
        self._held: dict[tuple[str, str], Lease] = {}
        self._keeper = LeaseKeeper(
            client._renew_many,
            interval=client.keep_alive_interval,
            margin=client.safety_margin,
            rpc_timeout=client.rpc_timeout,
            batch_size=RENEW_BATCH,
            concurrency=RENEW_CONCURRENCY,
            coalesce=min(RENEW_COALESCE_S, client.keep_alive_interval / 10),
            on_lost=self._lost,
        )
        self._keeping: anyio.CancelScope | None = None
        self._unreported: list[Lease] = []  # lost, not logged yet

    @property
    def locks(self) -> list[tuple[str, str]]:
        """Every lock of the set, held or not, as (service, domain)."""
        return list(self._locks)

    def __iter__(self) -> Iterator[Lease]:
        return (lease for lease in list(self._held.values()) if lease.is_valid)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, lock: LockName) -> Lease | None:
        """The valid lease on `lock` (a domain of the client's service, or a pair), or None."""
        lease = self._held.get(_lock_name(self._client.service, lock))
        return lease if lease is not None and lease.is_valid else None

    async def try_acquire(self) -> list[Lease]:
        """Try once to acquire every lock of the set not held now; the leases it got.

        Locks held by someone else are skipped. A lock the service could not answer
        for, or refused for a quota, is logged and left for the next try;
        `InvalidArgument`, `Unauthenticated` and `PermissionDenied` are raised.
        """
        client = self._client
        missing = [lock for lock in self._locks if self.get(lock) is None]
        granted: list[Lease] = []
        failed: list[tuple[tuple[str, str], ServiceUnavailable | QuotaExceeded]] = []
        calls = anyio.CapacityLimiter(SET_CALL_CONCURRENCY)

        async def acquire(lock: tuple[str, str]) -> None:
            async with calls:
                try:
                    response, sent_at = await client._grant(*lock)
                except (ServiceUnavailable, QuotaExceeded) as exc:
                    failed.append((lock, exc))
                    return
            if response.is_leader:
                stale = self._held.get(lock)
                if stale is not None:  # ran out before the keeper noticed: it ends now
                    self._keeper.discard(stale)
                    self._end(stale, EXPIRED)
                lease = client._new_lease(*lock, response, sent_at)
                self._held[lock] = lease
                self._keeper.add(lease)
                granted.append(lease)
                self._notify(self._callbacks.on_leader_elected, lease)

        try:
            async with anyio.create_task_group() as attempts:
                for lock in missing:
                    attempts.start_soon(acquire, lock)
        except ExceptionGroup as errors:
            raise errors.exceptions[0] from None
        if failed:
            (service, domain), error = failed[0]
            logger.warning(
                "could not try %s of %s locks (e.g. %s/%s): %s",
                len(failed),
                len(missing),
                service,
                domain,
                error,
            )
        return granted

    async def release(self, lock: LockName) -> bool:
        """Stop holding `lock` and release it; True when this call released it."""
        name = _lock_name(self._client.service, lock)
        lease = self._held.pop(name, None)
        if lease is None:
            return False
        self._keeper.discard(lease)
        try:
            return await self._client._release_lease(*name, lease.fencing_token)
        finally:
            self._end(lease, RELEASED)

    def _notify(self, callback: LeaseCallback | None, lease: Lease) -> None:
        if callback is not None:
            self._group.start_soon(self._client._notify, callback, lease)

    def _end(self, lease: Lease, reason: str) -> None:
        lease._end(reason)
        self._notify(self._callbacks.on_leader_lost, lease)

    def _lost(self, lease: Lease) -> None:
        """The keeper lost `lease`: it leaves the set, the others carry on."""
        name = (lease.service, lease.domain)
        if self._held.get(name) is lease:
            del self._held[name]
        if not self._unreported:
            self._group.start_soon(self._report_lost)
        self._unreported.append(lease)
        self._notify(self._callbacks.on_leader_lost, lease)

    async def _report_lost(self) -> None:
        """One log line for the leases lost together (one answer can refuse thousands)."""
        await anyio.sleep(0)  # let the rest of this answer come in first
        lost, self._unreported = self._unreported, []
        first = lost[0]
        logger.warning(
            "lost %s lock(s), e.g. %s/%s: %s",
            len(lost),
            first.service,
            first.domain,
            first.end_reason,
        )

    async def _keep(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.CancelScope() as self._keeping:
            task_status.started()
            await self._keeper.run()

    async def _close(self) -> None:
        """Stop renewing, then release every lease still held."""
        if self._keeping is not None:
            self._keeping.cancel()
        held, self._held = self._held, {}
        for lease in held.values():
            self._keeper.discard(lease)
        calls = anyio.CapacityLimiter(SET_CALL_CONCURRENCY)
        failures: list[Exception] = []

        async def release(lease: Lease) -> None:
            async with calls:
                try:
                    await self._client._release_lease(
                        lease.service, lease.domain, lease.fencing_token
                    )
                except BEST_EFFORT_FAILURES as exc:
                    failures.append(exc)
            self._end(lease, RELEASED)

        async with anyio.create_task_group() as releases:
            for lease in held.values():
                releases.start_soon(release, lease)
        if failures:
            logger.warning(
                "could not release %s of %s locks: %s", len(failures), len(held), failures[0]
            )
