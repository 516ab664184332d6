"""The LeaderElectionService: validates each call, runs it on the store, maps the answer.

A store failure is UNAVAILABLE and a passed deadline DEADLINE_EXCEEDED; "held by
someone else" is the only outcome reported as `is_leader=false`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from loguru import logger

from quorum_quest._rpc import pb
from quorum_quest.errors import InvalidArgument, StoreUnavailable
from quorum_quest.stores.base import MAX_NAME_BYTES, LockKey

if TYPE_CHECKING:
    from quorum_quest.server.runtime import Runtime

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]

NOT_HOLDER = timedelta(seconds=-1)


def _answers_with_status(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Run `handler` within the caller's deadline and turn our errors into gRPC statuses."""

    @functools.wraps(handler)
    async def serve(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            async with asyncio.timeout(context.time_remaining()):
                return await handler(self, request, context)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreUnavailable as exc:
            logger.warning("store call failed: {}", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the store answered"
            )
        raise AssertionError("unreachable: context.abort raises")

    return serve


def _name(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_NAME_BYTES} bytes of UTF-8")
    return value


def _lock_key(request: Any) -> LockKey:
    return LockKey(_name("service", request.service), _name("domain", request.domain))


class LeaderElectionServicer:
    """Serves the contract in `protos/` from the runtime's current store and settings."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def _ttl_ms(self, request: pb.TryAcquireLockRequest | pb.KeepAliveRequest) -> int:
        """ttl_ms wins when set; ttl <= 0 means the default; above the maximum is an error."""
        policy = self._runtime.policy
        if request.ttl_ms > 0:
            ttl_ms, field = request.ttl_ms, "ttl_ms"
        elif request.ttl > 0:
            ttl_ms, field = request.ttl * 1000, "ttl"
        else:
            return policy.default_ttl_ms
        if ttl_ms > policy.max_ttl_ms:
            raise InvalidArgument(
                field,
                f"{ttl_ms / 1000:g} s is above the maximum lease of {policy.max_ttl_ms / 1000:g} s",
            )
        return ttl_ms

    @_answers_with_status
    async def try_acquire_lock(
        self, request: pb.TryAcquireLockRequest, context: grpc.aio.ServicerContext
    ) -> pb.TryAcquireLockResponse:
        key = _lock_key(request)
        client_id = _name("client_id", request.client_id)
        ttl_ms = self._ttl_ms(request)
        result = await self._runtime.store.acquire(key, client_id, ttl_ms)
        if not result.acquired:
            return pb.TryAcquireLockResponse(
                is_leader=False,
                leader_id=result.holder,
                lease_length=timedelta(milliseconds=result.ttl_ms),
            )
        if not result.refreshed:
            logger.info(
                "lock acquired: service={} domain={} client_id={} token={} ttl_ms={}",
                key.service,
                key.domain,
                client_id,
                result.token,
                ttl_ms,
            )
        return pb.TryAcquireLockResponse(
            is_leader=True,
            fencing_token=result.token,
            lease_length=timedelta(milliseconds=result.ttl_ms),
            leader_id=client_id,
        )

    @_answers_with_status
    async def keep_alive(
        self, request: pb.KeepAliveRequest, context: grpc.aio.ServicerContext
    ) -> pb.KeepAliveResponse:
        key = _lock_key(request)
        client_id = _name("client_id", request.client_id)
        ttl_ms = self._ttl_ms(request)
        result = await self._runtime.store.keep_alive(key, client_id, ttl_ms)
        if not result.renewed:
            logger.info(
                "lock lost: keep-alive refused, service={} domain={} client_id={}",
                key.service,
                key.domain,
                client_id,
            )
            return pb.KeepAliveResponse(lease_length=NOT_HOLDER)
        return pb.KeepAliveResponse(
            lease_length=timedelta(milliseconds=ttl_ms), fencing_token=result.token
        )

    @_answers_with_status
    async def release_lock(
        self, request: pb.ReleaseLockRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseLockResponse:
        key = _lock_key(request)
        client_id = _name("client_id", request.client_id)
        released = await self._runtime.store.release(key, client_id)
        if released:
            logger.info(
                "lock released: service={} domain={} client_id={}",
                key.service,
                key.domain,
                client_id,
            )
        return pb.ReleaseLockResponse(released=released)

    @_answers_with_status
    async def get_leader(
        self, request: pb.GetLeaderRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLeaderResponse:
        holder = await self._runtime.store.get_leader(_lock_key(request))
        if holder is None:
            return pb.GetLeaderResponse(has_leader=False)
        return pb.GetLeaderResponse(
            has_leader=True,
            client_id=holder.client_id,
            fencing_token=holder.token,
            remaining=timedelta(milliseconds=holder.remaining_ms),
        )
