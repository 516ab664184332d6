"""The one place that binds the service's messages to grpc.aio.

The betterproto2 generator emits messages but no grpc.aio servicer, so the service's
method table lives here: the server registers a servicer through
`grpc.method_handlers_generic_handler`, and the client builds its stub from the
same table.

Two codecs serve the same `.proto`. Tests, tools and users of the raw stub speak
`pb`, the generated betterproto2 dataclasses. The server and the SDK speak `wire`:
protobuf's own (upb, C) message classes, built at import from the file descriptors
betterproto2 generated alongside its dataclasses, in its private descriptor pool.
Decoding a request and encoding an answer costs ~3 µs there against ~40 µs with
dataclasses, and a call's codec was the largest part of the service's own cost
(docs/architecture.md, "Message codec"). Both are one wire format: a test
round-trips every message through both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory

from quorum_quest.api.google_proto_descriptor_pool import default_google_proto_descriptor_pool
from quorum_quest.api.quorum.quest.api import v1 as pb

SERVICE_NAME = "quorum.quest.api.v1.LeaderElectionService"


class WireMessages:
    """protobuf (upb) classes of every message of the service's `.proto`, by message name.

    Attributes are filled at import (`wire.TryAcquireLockRequest`, ...); the private
    descriptor pool keeps them apart from any other copy of the same `.proto` a
    process may load into protobuf's default pool.
    """

    def __init__(self) -> None:
        service = default_google_proto_descriptor_pool.FindServiceByName(SERVICE_NAME)
        for name, descriptor in service.file.message_types_by_name.items():
            setattr(self, name, message_factory.GetMessageClass(descriptor))

    def __getattr__(self, name: str) -> Any:  # for type checkers: attributes are dynamic
        raise AttributeError(f"the service's .proto has no message {name!r}")


wire = WireMessages()


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
    """A handler serving every method of `METHODS` from `servicer`'s async methods.

    The servicer receives and returns `wire` messages.
    """
    handlers = {}
    for method in METHODS:
        request = getattr(wire, method.request.__name__)
        response = getattr(wire, method.response.__name__)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.attribute),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class LeaderElectionStub:
    """A grpc.aio client of the service: one awaitable callable per RPC.

    It sends and answers `messages` (a module or namespace naming every message of the
    service): `pb` by default, `wire` for a caller that wants protobuf's own messages.
    """

    try_acquire_lock: grpc.aio.UnaryUnaryMultiCallable
    release_lock: grpc.aio.UnaryUnaryMultiCallable
    keep_alive: grpc.aio.UnaryUnaryMultiCallable
    get_leader: grpc.aio.UnaryUnaryMultiCallable
    get_status: grpc.aio.UnaryUnaryMultiCallable
    keep_alive_many: grpc.aio.UnaryUnaryMultiCallable

    def __init__(self, channel: grpc.aio.Channel, messages: Any = pb) -> None:
        for method in METHODS:
            request = getattr(messages, method.request.__name__)
            response = getattr(messages, method.response.__name__)
            call = channel.unary_unary(
                method.path,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            setattr(self, method.attribute, call)
