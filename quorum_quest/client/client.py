"""The async Python SDK: `QuorumQuestClient` and its `leadership()` context manager."""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import grpc
from loguru import logger
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from quorum_quest._rpc import LeaderElectionStub, pb
from quorum_quest.client.lease import Lease, keep_alive
from quorum_quest.errors import InvalidArgument, LeadershipLost, ServiceUnavailable

# Like the clients generated from the original contract: ping every 10 s, also idle.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)

LeaseCallback = Callable[[Lease], "Awaitable[None] | None"]


@dataclass(frozen=True)
class Callbacks:
    """Called (sync or async) when this client becomes leader and when it stops being one."""

    on_leader_elected: LeaseCallback | None = None
    on_leader_lost: LeaseCallback | None = None


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _rpc_error(exc: grpc.aio.AioRpcError) -> Exception:
    details = exc.details() or exc.code().name
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, reason = details.partition(": ")
        return InvalidArgument(field, reason) if reason else InvalidArgument("request", details)
    return ServiceUnavailable(f"{exc.code().name}: {details}", code=exc.code())


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
    ) -> None:
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
        self._channel: grpc.aio.Channel | None = None
        self._stub: LeaderElectionStub | None = None
        self._lease: Lease | None = None
        self._holder_hint: timedelta | None = None  # what was left of the holder's lease
        self._abandoned_token = 0  # a lease whose release got no answer
        self._keep_alive_task: asyncio.Task[None] | None = None

    # -- connection -------------------------------------------------------------

    @property
    def stub(self) -> LeaderElectionStub:
        if self._stub is None:
            # Client spans and W3C trace context, whenever the application configured
            # OpenTelemetry (without it the global tracer is a no-op).
            self._channel = grpc.aio.insecure_channel(
                self.address, options=CHANNEL_OPTIONS, interceptors=aio_client_interceptors()
            )
            self._stub = LeaderElectionStub(self._channel)
        return self._stub

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout or self.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from None

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
            except (ServiceUnavailable, InvalidArgument) as exc:
                logger.warning(
                    "could not release {}/{} on close: {}", self.service, self.domain, exc
                )
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

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
                "leadership callback {} failed", getattr(callback, "__name__", callback)
            )

    # -- the Go client's calls ----------------------------------------------------

    async def try_acquire_lock(self) -> bool:
        """Acquire the lock if free (or refresh ours); True when this client leads."""
        sent_at = time.monotonic()
        response = await self._acquire()
        if response.is_leader and response.fencing_token == self._abandoned_token:
            # The service still holds a lease this client tried to release without an
            # answer. Never resume it as a new leadership: release it for sure, then
            # acquire afresh, so each grant this client acts on has a larger token.
            await self._release()
            self._abandoned_token = 0
            sent_at = time.monotonic()
            response = await self._acquire()
        if not response.is_leader:
            await self._drop_lease()
            self._holder_hint = response.lease_length
            return False
        granted = response.lease_length.total_seconds()
        if self._lease is not None and self._lease.fencing_token == response.fencing_token:
            self._lease._renewed(sent_at, granted, self.safety_margin, response.fencing_token)
            return True
        await self._drop_lease()
        self._lease = Lease(
            self.service,
            self.domain,
            self.client_id,
            response.fencing_token,
            granted,
            sent_at + granted - self.safety_margin,
        )
        await self._notify(self.callbacks.on_leader_elected, self._lease)
        return True

    async def _acquire(self) -> pb.TryAcquireLockResponse:
        return await self._call(
            self.stub.try_acquire_lock,
            pb.TryAcquireLockRequest(
                service=self.service,
                domain=self.domain,
                client_id=self.client_id,
                ttl=max(1, math.ceil(self.ttl)),
                ttl_ms=max(1, round(self.ttl * 1000)),
            ),
        )

    async def _renew(self, timeout: float) -> tuple[float, int] | None:
        response = await self._call(
            self.stub.keep_alive,
            pb.KeepAliveRequest(
                service=self.service,
                domain=self.domain,
                client_id=self.client_id,
                ttl=max(1, math.ceil(self.ttl)),
                ttl_ms=max(1, round(self.ttl * 1000)),
            ),
            timeout=timeout,
        )
        granted = response.lease_length.total_seconds() if response.lease_length else -1.0
        return (granted, response.fencing_token) if granted > 0 else None

    async def _keep_until_lost(self, lease: Lease) -> str:
        return await keep_alive(
            lease,
            self._renew,
            interval=self.keep_alive_interval,
            margin=self.safety_margin,
            rpc_timeout=self.rpc_timeout,
        )

    async def _drop_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await self._notify(self.callbacks.on_leader_lost, lease)

    async def start_keep_alive(self) -> None:
        """Keep the held lease alive in the background until stopped, released or lost."""
        lease = self._lease
        if lease is None:
            raise LeadershipLost(f"{self.client_id} does not hold {self.service}/{self.domain}")
        self.stop_keep_alive()

        async def run() -> None:
            reason = await self._keep_until_lost(lease)
            logger.warning("lost {}/{}: {}", self.service, self.domain, reason)
            if self._lease is lease:
                await self._drop_lease()

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
            released = await self._release()
        except (ServiceUnavailable, InvalidArgument):
            if lease is not None:
                self._abandoned_token = lease.fencing_token
            raise
        finally:
            await self._drop_lease()
        if lease is not None and lease.fencing_token == self._abandoned_token:
            self._abandoned_token = 0
        return released

    async def _release(self) -> bool:
        response = await self._call(
            self.stub.release_lock,
            pb.ReleaseLockRequest(
                service=self.service, domain=self.domain, client_id=self.client_id
            ),
        )
        return response.released

    async def get_leader(self) -> tuple[str, int] | None:
        """The current holder's client_id and fencing token, or None when the lock is free."""
        response = await self._call(
            self.stub.get_leader, pb.GetLeaderRequest(service=self.service, domain=self.domain)
        )
        return (response.client_id, response.fencing_token) if response.has_leader else None

    # -- leadership -----------------------------------------------------------------

    async def wait_for_leadership(self, timeout: float | None = None) -> Lease:
        """Try to acquire until this client leads; `TimeoutError` after `timeout` seconds."""
        delay = 0.05
        with anyio.fail_after(timeout):
            while True:
                try:
                    if await self.try_acquire_lock():
                        assert self._lease is not None
                        return self._lease
                    # Poll faster as the holder's lease nears its end, never busier than 50 ms.
                    hint = self._holder_hint.total_seconds() if self._holder_hint else delay
                    pause = max(0.05, min(delay, hint))
                except ServiceUnavailable as exc:
                    logger.warning("waiting for {}/{}: {}", self.service, self.domain, exc)
                    pause = delay
                await anyio.sleep(pause * random.uniform(0.5, 1.0))
                delay = min(delay * 2, max(0.05, self.keep_alive_interval))

    @asynccontextmanager
    async def leadership(self, timeout: float | None = None) -> AsyncIterator[Lease]:
        """Lead for the duration of the block.

        Waits (with backoff and jitter) until this client holds the lock, or raises
        `TimeoutError` after `timeout` seconds. The lease is kept alive in the
        background; if it cannot be renewed before it would expire, the body is
        cancelled and `LeadershipLost` is raised. The lock is released on exit.
        """
        lease = await self.wait_for_leadership(timeout)
        self.stop_keep_alive()
        lost: LeadershipLost | None = None
        try:
            async with anyio.create_task_group() as guard:

                async def keep() -> None:
                    nonlocal lost
                    reason = await self._keep_until_lost(lease)
                    lost = LeadershipLost(f"lost {self.service}/{self.domain}: {reason}")
                    guard.cancel_scope.cancel()

                guard.start_soon(keep)
                try:
                    yield lease
                finally:
                    guard.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if lost is None:
                    try:
                        await self.release_lock()
                    except (ServiceUnavailable, InvalidArgument) as exc:
                        logger.warning(
                            "could not release {}/{}: {}", self.service, self.domain, exc
                        )
                elif self._lease is lease:
                    await self._drop_lease()
        if lost is not None:
            raise lost
