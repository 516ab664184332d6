"""The one place that binds the generated messages to grpc.aio.

The betterproto2 generator emits messages but no grpc.aio servicer, so the service's
method table lives here: the server registers a servicer through
`grpc.method_handlers_generic_handler`, and the client builds its stub from the
same table, both with the messages' own (de)serializers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from quorum_quest.api.quorum.quest.api import v1 as pb

SERVICE_NAME = "quorum.quest.api.v1.LeaderElectionService"


@dataclass(frozen=True, slots=True)
class Method:
    name: str  # the RPC's name in the .proto
    attribute: str  # the servicer's / stub's Python method
    request: type[Any]
    response: type[Any]

    @property
    def path(self) -> str:
        return f"/{SERVICE_NAME}/{self.name}"


METHODS = (
    Method(
        "TryAcquireLock", "try_acquire_lock", pb.TryAcquireLockRequest, pb.TryAcquireLockResponse
    ),
    Method("ReleaseLock", "release_lock", pb.ReleaseLockRequest, pb.ReleaseLockResponse),
    Method("KeepAlive", "keep_alive", pb.KeepAliveRequest, pb.KeepAliveResponse),
    Method("GetLeader", "get_leader", pb.GetLeaderRequest, pb.GetLeaderResponse),
    Method("GetStatus", "get_status", pb.GetStatusRequest, pb.GetStatusResponse),
    Method("KeepAliveMany", "keep_alive_many", pb.KeepAliveManyRequest, pb.KeepAliveManyResponse),
)


def service_handler(servicer: object) -> grpc.GenericRpcHandler:
    """A handler serving every method of `METHODS` from `servicer`'s async methods."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.attribute),
            request_deserializer=method.request.FromString,
            response_serializer=method.response.SerializeToString,
        )
        for method in METHODS
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class LeaderElectionStub:
    """A grpc.aio client of the service: one awaitable callable per RPC."""

    try_acquire_lock: grpc.aio.UnaryUnaryMultiCallable
    release_lock: grpc.aio.UnaryUnaryMultiCallable
    keep_alive: grpc.aio.UnaryUnaryMultiCallable
    get_leader: grpc.aio.UnaryUnaryMultiCallable
    get_status: grpc.aio.UnaryUnaryMultiCallable
    keep_alive_many: grpc.aio.UnaryUnaryMultiCallable

    def __init__(self, channel: grpc.aio.Channel) -> None:
        for method in METHODS:
            call = channel.unary_unary(
                method.path,
                request_serializer=method.request.SerializeToString,
                response_deserializer=method.response.FromString,
            )
            setattr(self, method.attribute, call)
