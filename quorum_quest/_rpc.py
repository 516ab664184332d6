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

Bytes that are not a request of the method's type (garbage, a truncated message,
invalid UTF-8 in a string field) are answered INVALID_ARGUMENT naming the message, and
the field where one is to blame; never UNKNOWN, which grpc.aio answers, with an ERROR
and a traceback in the log, when a deserializer raises. So every handler the server
registers — the service's own, and the stock health and reflection servicers through
`DecodingRegistrar` — goes through `decoding`: its deserializer returns an
`Undecodable` instead of raising, and its behaviour refuses one before the servicer
sees it. A request that decodes pays a function call, an `is` test and one more
coroutine frame: ~0.15 µs, against the few hundred µs of server CPU a call costs
(docs/performance.md).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor

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
    streams: bool = False  # the server answers with a stream of responses
    takes_stream: bool = False  # the client sends a stream of requests

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
    Method("WatchLeaders", "watch_leaders", pb.WatchLeadersRequest, pb.LeaderChange, streams=True),
    Method(
        "Session",
        "session",
        pb.SessionRequest,
        pb.SessionResponse,
        streams=True,
        takes_stream=True,
    ),
)

# The stream-stream, unary-stream and unary-unary builders, by `Method.takes_stream`
# and `Method.streams`.
_SERVER_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


# Told of every request refused as undecodable: (method path, reason, the caller's peer).
Refused = Callable[[str, str, str], None]


def service_handler(servicer: object, refused: Refused) -> grpc.GenericRpcHandler:
    """A handler serving every method of `METHODS` from `servicer`'s async methods.

    The servicer receives and returns `wire` messages; a request that cannot be decoded
    is refused (see `decoding`) before it reaches the servicer.
    """
    handlers = {}
    for method in METHODS:
        request = getattr(wire, method.request.__name__)
        response = getattr(wire, method.response.__name__)
        build = _SERVER_HANDLERS[method.takes_stream, method.streams]
        handler = build(
            getattr(servicer, method.attribute),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        handlers[method.name] = decoding(method.path, handler, refused)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


# -- requests that cannot be decoded ------------------------------------------------------

# How many fields `Undecodable.reason` reads to find the culprit before it gives up: a
# bad request costs at most this much Python, however large it is.
LOCATE_BUDGET = 4096


class Undecodable:
    """What a request became whose bytes are not a message of the method's request type.

    `decoding`'s deserializers return one instead of raising; the reason is worked out
    only when the request is refused.
    """

    __slots__ = ("data", "descriptor", "error")

    def __init__(self, data: bytes, descriptor: Descriptor | None, error: Exception) -> None:
        self.data = data
        self.descriptor = descriptor
        self.error = error

    def reason(self) -> str:
        """`<field>: not valid UTF-8 (<message>)` where a string field is to blame, else
        `<message>: cannot be decoded: <what, where>`."""
        if self.descriptor is None:
            return f"the request cannot be decoded: {type(self.error).__name__}"
        name = self.descriptor.full_name
        try:
            where = _locate(self.descriptor, self.data, "", [LOCATE_BUDGET])
        except _Corrupt as exc:
            return f"{name}: cannot be decoded: {exc}"
        except Exception:  # finding the culprit is a courtesy: never fail the refusal
            where = None
        if where is not None:
            return f"{where}: not valid UTF-8 ({name})"
        return f"{name}: cannot be decoded: the wire format is corrupt"


class _Corrupt(Exception):
    pass


def _varint(data: bytes, pos: int, inside: str) -> tuple[int, int]:
    value = shift = 0
    for index in range(pos, min(pos + 10, len(data))):
        value |= (data[index] & 0x7F) << shift
        if data[index] < 0x80:
            return value, index + 1
        shift += 7
    if pos + 10 <= len(data):
        raise _Corrupt(f"a varint longer than 10 bytes at byte {pos}{inside}")
    raise _Corrupt(f"truncated at byte {len(data)}{inside}")


def _locate(descriptor: Descriptor, data: bytes, path: str, budget: list[int]) -> str | None:
    """The path of the string field of `data` (a `descriptor` message) that is not valid
    UTF-8; raises `_Corrupt` saying where the wire format breaks; None when neither is
    found within the budget (protobuf's own limits, such as nesting depth)."""
    pos, end = 0, len(data)
    groups: list[int] = []
    seen: dict[int, int] = {}
    inside = f" of {path[:-1]}" if path else ""
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            return None
        start = pos
        key, pos = _varint(data, pos, inside)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _Corrupt(f"field number 0 at byte {start}{inside}")
        if wire_type == 0:
            _, pos = _varint(data, pos, inside)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            length, pos = _varint(data, pos, inside)
            value, pos = data[pos : pos + length], pos + length
            field = None if groups or pos > end else descriptor.fields_by_number.get(number)
            if field is not None:
                name = path + field.name
                if field.is_repeated:
                    seen[number] = seen.get(number, -1) + 1
                    name += f"[{seen[number]}]"
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        value.decode()
                    except UnicodeDecodeError:
                        return name
                elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
                    inner = _locate(field.message_type, value, f"{name}.", budget)
                    if inner is not None:
                        return inner
        elif wire_type == 3:
            groups.append(number)
        elif wire_type == 4:
            if not groups or groups.pop() != number:
                raise _Corrupt(f"an end-group without its start at byte {start}{inside}")
        else:
            raise _Corrupt(f"wire type {wire_type} at byte {start}{inside}")
        if pos > end:
            raise _Corrupt(f"truncated at byte {end}{inside}")
    if groups:
        raise _Corrupt(f"truncated at byte {end}{inside}")
    return None


def _decoder(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`parse`, answering an `Undecodable` instead of raising."""
    message_class = getattr(parse, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)

    def decode(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # the caller's bytes: whatever fails, they were the cause
            return Undecodable(data, descriptor, exc)

    return decode


def decoding(
    method: str, handler: grpc.RpcMethodHandler[Any, Any], refused: Refused
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler`, with a request that cannot be decoded answered INVALID_ARGUMENT (and
    `refused` told) instead of reaching its behaviour. A handler of raw bytes or with a
    synchronous behaviour is returned as it is."""
    parse = handler.request_deserializer
    # grpc's stubs type a behaviour as synchronous; the ones wrapped here are async.
    behaviour: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    streams = inspect.isasyncgenfunction(behaviour)
    if parse is None or not (streams or inspect.iscoroutinefunction(behaviour)):
        return handler

    async def refuse(request: Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        reason = request.reason()
        refused(method, reason, context.peer())
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)

    async def checked(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if request.__class__ is Undecodable:
                await refuse(request, context)
            yield request

    async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if handler.request_streaming:
            return checked(request, context)
        if request.__class__ is Undecodable:
            await refuse(request, context)
        return request

    serve: Callable[..., Any]
    if streams:

        async def serve(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async for response in behaviour(await admitted(request, context), context):
                yield response

    elif handler.request_streaming:

        async def serve(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await behaviour(checked(request, context), context)

    else:  # a unary request, as every method of the service's own: no extra await

        async def serve(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if request.__class__ is Undecodable:
                await refuse(request, context)
            return await behaviour(request, context)

    build = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[handler.request_streaming, handler.response_streaming]
    return build(
        serve,
        request_deserializer=_decoder(parse),
        response_serializer=handler.response_serializer,
    )


class _DecodingGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped by `decoding`."""

    def __init__(self, inner: grpc.GenericRpcHandler, refused: Refused) -> None:
        self._inner = inner
        self._refused = refused
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(details)
        if handler is None:
            return None
        known = self._wrapped.get(details.method)
        if known is None or known[0] is not handler:
            known = (handler, decoding(details.method, handler, self._refused))
            self._wrapped[details.method] = known
        return known[1]


class DecodingRegistrar:
    """Stands in for a grpc.aio server while a library registers its servicer (health,
    reflection), so that every handler it registers goes through `decoding`."""

    def __init__(self, server: grpc.aio.Server, refused: Refused) -> None:
        self._server = server
        self._refused = refused

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_DecodingGenericHandler(handler, self._refused) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service,
            {
                name: decoding(f"/{service}/{name}", handler, self._refused)
                for name, handler in handlers.items()
            },
        )


class LeaderElectionStub:
    """A grpc.aio client of the service: one callable per RPC, awaitable for a unary one,
    an async iterator of responses for a streaming one (`watch_leaders`), a call to
    write requests to and read responses from for `session`.

    It sends and answers `messages` (a module or namespace naming every message of the
    service): `pb` by default, `wire` for a caller that wants protobuf's own messages.
    """

    try_acquire_lock: grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    release_lock: grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    keep_alive: grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    get_leader: grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    get_status: grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    keep_alive_many: grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    watch_leaders: grpc.aio.UnaryStreamMultiCallable[Any, Any]
    session: grpc.aio.StreamStreamMultiCallable[Any, Any]

    def __init__(self, channel: grpc.aio.Channel, messages: Any = pb) -> None:
        for method in METHODS:
            request = getattr(messages, method.request.__name__)
            response = getattr(messages, method.response.__name__)
            if method.takes_stream:
                open_call: Any = channel.stream_stream
            else:
                open_call = channel.unary_stream if method.streams else channel.unary_unary
            call = open_call(
                method.path,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            setattr(self, method.attribute, call)
