"""The async Python SDK's client of one lock: `QuorumQuestClient`.

This module holds the client itself: its construction (the timing knobs checked
together), its connection and calls (over the shared `Session` stream, else unary
calls), the lease it holds, and the Go client's calls. What it guarantees:

- a grant answered after its lease would have ended is given back at once, never acted on;
- a lease whose release got no answer is never resumed as a new leadership: handed back
  by the service, it is released first and acquired afresh, so each grant this client
  acts on has a larger fencing token;
- `release_lock()` ends the lease for this client whether or not the service answered.

Built on it, each in a room of its own: `leadership()`, `leaderships()` and
`wait_for_leadership()` (`leadership.py`), the `LeaseSet` of `leaderships()`
(`lease_set.py`), watching who leads (`watch.py`); all over one keep-alive
(`lease.py`) and one session per service (`session.py`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

import grpc

from quorum_quest._rpc import SERVICE_NAME, LeaderElectionStub, wire
from quorum_quest.client import leadership as _leadership
from quorum_quest.client import watch as _watch
from quorum_quest.client.connection import (
    ClientTLS,
    bearer_metadata,
    open_channel,
    token_from_environment,
)
from quorum_quest.client.leadership import Callbacks as Callbacks  # re-exported
from quorum_quest.client.leadership import LeaseCallback
from quorum_quest.client.lease import RELEASED, Lease, keep_alive
from quorum_quest.client.lease_set import LeaseSet as LeaseSet  # re-exported
from quorum_quest.client.lease_set import LockName as LockName  # re-exported
from quorum_quest.client.session import OPERATIONS, Session, SessionUnsupported, leave, session_for
from quorum_quest.client.status import BEST_EFFORT_FAILURES, rpc_error
from quorum_quest.client.tracing import client_interceptors
from quorum_quest.errors import (
    AccessRefused,
    InvalidArgument,
    LeadershipLost,
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
        session: bool | None = None,
    ) -> None:
        """`tls`: a `ClientTLS`, True for TLS verified against the system's roots, False
        for plaintext; `token`: a bearer token sent with every call ("" for none). Left
        at None, each comes from the environment (`QUORUMQUEST_TLS*`,
        `QUORUMQUEST_TOKEN`, `QUORUMQUEST_TOKEN_FILE`; see `quorum_quest.client.connection`),
        and is plaintext without a token when that sets nothing.

        `session`: True sends acquires, renewals, releases and leader queries over the
        `Session` stream that every client of this address and credentials in the
        event loop shares (`quorum_quest.client.session`), far cheaper than a unary
        call each; False, and against a service without it, unary calls. Left at None:
        the stream, unless the application traces calls (OpenTelemetry configured by
        the first call): then unary calls, each with its span and trace context."""
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
        self._use_session = session  # None: decided by the first call
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
        if self._use_session is None:
            self._use_session = client_interceptors() is None
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

    # -- leadership (client/leadership.py) ------------------------------------------

    async def wait_for_leadership(self, timeout: float | None = None) -> Lease:
        """Try to acquire until this client leads, call `on_leader_elected`, return the lease.

        Raises `TimeoutError` after `timeout` seconds, the callback included. A grant this
        call does not hand to its caller (the timeout or a cancellation struck while the
        acquire was answered or the callback ran) is released, best effort, rather than
        left to block the lock for a whole ttl.
        """
        return await _leadership.wait_for_leadership(self, timeout)

    def leadership(self, timeout: float | None = None) -> AbstractAsyncContextManager[Lease]:
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
        return _leadership.leadership(self, timeout)

    def leaderships(
        self, locks: Iterable[LockName], *, callbacks: Callbacks | None = None
    ) -> AbstractAsyncContextManager[LeaseSet]:
        """Hold as many of `locks` as are free, all kept alive together, for the block.

        A lock is a domain of this client's service, or a `(service, domain)` pair.
        On entry each lock is tried once; `await leases.try_acquire()` tries the
        missing ones again. Every held lease is renewed by one background loop with
        batched `KeepAliveMany` calls, with the guarantees of `leadership()` for each
        lease on its own. A lost lease ends (`lease.wait_ended()`, `is_valid` turns
        false, `callbacks.on_leader_lost` is called) and leaves the set; the others
        and the block go on. Every lease still held is released on exit.
        """
        return _leadership.leaderships(self, locks, callbacks)

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
