"""The SDK's session: the lock operations of every client of one service, over one stream.

A unary call costs grpc a few hundred µs of CPU on each side whatever it carries; a
message on an open stream costs a fraction of that, and one message carries every
operation the application's tasks asked for while the last one was being written.
So the clients of one service address (and credentials, and channel options) in one
event loop share one `Session`: one channel and one `Session` stream, opened on the
first operation and closed when the last client using it closes.

Each operation carries an id and a deadline; answers come in any order. What may
happen to an operation:

- answered: its result, or the status its unary call would have ended with, raised
  as the same exception (`ServiceUnavailable`, `InvalidArgument`, `AccessRefused`...);
- never written (no stream could be opened within its deadline): `ServiceUnavailable`;
  nothing was sent. While the service cannot be reached a session keeps trying to open
  a stream, every `REOPEN_S`, for as long as an operation waits: a renewal reaches a
  restarted service as soon as it is back, as a unary renewal with `waitForReady`;
- written, and the stream ended or the deadline passed before its answer:
  `ServiceUnavailable` whose message says the outcome is unknown. The caller treats it
  as any unary call that got no answer (an acquire may have been granted);
- the service has no `Session` method (a server of the original contract):
  `SessionUnsupported`, before anything ran; the client then uses unary calls.

The stream is a protocol of its own on top of grpc's: grpc.aio has no way to batch
unary calls, hence this module rather than a library's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import grpc

from quorum_quest._rpc import LeaderElectionStub, wire
from quorum_quest.client.status import status_error
from quorum_quest.errors import ServiceUnavailable

logger = logging.getLogger("quorum_quest.client")

# The operations a session carries: the `SessionOperation` oneof fields, which are also
# the stub's method names of their unary calls.
OPERATIONS = frozenset({"try_acquire_lock", "keep_alive", "release_lock", "get_leader"})
# The service's first word on a stream it took (see quorum_quest.server.session).
SESSION_HEADER = ("quorum-quest-session", "1")
# How long a session waits before opening a stream again after one was refused or
# could not reach the service, while operations wait.
REOPEN_S = 0.1


class SessionUnsupported(Exception):
    """The service has no `Session` method: nothing was run; use the unary call."""


@dataclass(eq=False)
class _Operation:
    id: int
    kind: str
    request: Any
    expires: float  # loop.time() when the caller stops waiting
    future: asyncio.Future[Any]
    sent: bool = False  # handed to grpc to write: the service may have run it


@dataclass(eq=False)
class _Stream:
    """One `Session` call, and the operations written on it that have no answer yet."""

    call: Any  # grpc.aio.StreamStreamCall
    unanswered: dict[int, _Operation] = field(default_factory=dict)
    accepted: bool = False  # the service sent SESSION_HEADER: it took the stream
    status: grpc.StatusCode | None = None
    details: str = ""


class Session:
    """One channel and `Session` stream to a service, shared by the clients of
    `session_for`'s key. `call` sends one operation and returns its answer."""

    def __init__(self, key: Hashable, channel: grpc.aio.Channel, metadata: Any) -> None:
        self.key = key
        self._channel = channel
        self._stub = LeaderElectionStub(channel, wire)
        self._metadata = metadata
        self._ids = itertools.count(1)
        self._queued: list[_Operation] = []  # not written yet
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.unsupported = False
        self.users = 0

    async def call(self, kind: str, request: Any, timeout: float) -> Any:
        """The answer of operation `kind` (a unary method's name) on `request`: the
        unary call's response message, or its status raised as that call's error."""
        if self.unsupported:
            raise SessionUnsupported
        if self._closed:
            raise ServiceUnavailable("the client was closed")
        loop = asyncio.get_running_loop()
        operation = _Operation(
            next(self._ids), kind, request, loop.time() + timeout, loop.create_future()
        )
        self._queued.append(operation)
        self._wake.set()
        if self._runner is None:
            self._runner = loop.create_task(self._run())
        try:
            async with asyncio.timeout(timeout):
                result = await operation.future
        except TimeoutError:
            operation.future.cancel()  # the writer skips it, a late answer is dropped
            if not operation.sent:
                raise ServiceUnavailable(
                    f"UNAVAILABLE: no connection to the service within {timeout:g} s",
                    code=grpc.StatusCode.UNAVAILABLE,
                ) from None
            raise ServiceUnavailable(
                f"DEADLINE_EXCEEDED: no answer within {timeout:g} s; the outcome is unknown",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except asyncio.CancelledError:
            operation.future.cancel()
            raise
        if result.code:
            raise status_error(_STATUS.get(result.code, grpc.StatusCode.UNKNOWN), result.message)
        return getattr(result, kind)

    async def close(self) -> None:
        """End the stream and close the channel; operations still waiting fail."""
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self._fail_queued(ServiceUnavailable("the client was closed"))
        await self._channel.close()

    # -- the stream ---------------------------------------------------------------

    def _pending(self) -> bool:
        return any(not operation.future.done() for operation in self._queued)

    async def _run(self) -> None:
        """Open streams for as long as operations wait, and write them."""
        try:
            while self._pending():
                stream = await self._serve_one_stream()
                if not stream.accepted:
                    # Refused before it ran anything (no `Session` method, credentials,
                    # an instance shutting down, no connection): what it was sent is
                    # as good as never sent.
                    unsent = [op for op in stream.unanswered.values() if not op.future.done()]
                    for operation in unsent:
                        operation.sent = False
                    self._queued[:0] = unsent
                    if stream.status == grpc.StatusCode.UNIMPLEMENTED:
                        self.unsupported = True
                        self._fail_queued(SessionUnsupported())
                        return
                    if stream.status in _REFUSALS:
                        self._fail_queued(_stream_error(stream))
                    else:
                        await asyncio.sleep(REOPEN_S)
                    continue
                self._fail_unanswered(stream)
        finally:
            if self._runner is asyncio.current_task():
                self._runner = None

    async def _serve_one_stream(self) -> _Stream:
        """Run one `Session` call until it ends; returns it with what ended it."""
        stream = _Stream(self._stub.session(metadata=self._metadata))
        self._wake.set()  # operations may wait already
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(stream))
        reader.add_done_callback(lambda _: self._wake.set())
        try:
            while not reader.done():
                await self._wake.wait()
                self._wake.clear()
                if reader.done():
                    break
                batch = [op for op in self._queued if not op.future.done()]
                self._queued.clear()
                if not batch:
                    continue
                for operation in batch:
                    operation.sent = True
                    stream.unanswered[operation.id] = operation
                now = loop.time()
                message = wire.SessionRequest(
                    operations=[
                        {
                            "id": op.id,
                            "deadline_ms": max(1, round((op.expires - now) * 1000)),
                            op.kind: op.request,
                        }
                        for op in batch
                    ]
                )
                try:
                    await stream.call.write(message)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    break  # the stream has ended: the reader says how
            await reader
        finally:
            if not reader.done():
                reader.cancel()
            stream.call.cancel()
        return stream

    async def _read(self, stream: _Stream) -> None:
        call = stream.call
        try:
            metadata = await call.initial_metadata()
            stream.accepted = metadata is not None and SESSION_HEADER in tuple(metadata)
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                unanswered = stream.unanswered
                for result in response.results:
                    operation = unanswered.pop(result.id, None)
                    if operation is not None and not operation.future.done():
                        operation.future.set_result(result)
            stream.status = await call.code()
            stream.details = await call.details() or ""
        except grpc.aio.AioRpcError as exc:
            stream.status = exc.code()
            stream.details = exc.details() or ""
        if stream.status is None or stream.status == grpc.StatusCode.OK:
            stream.status = grpc.StatusCode.UNAVAILABLE
            stream.details = stream.details or "the service ended the session"

    def _fail_unanswered(self, stream: _Stream) -> None:
        """Operations written on a stream that ended before their answer: their outcome
        is unknown."""
        error = ServiceUnavailable(
            f"{_name(stream.status)}: the session ended before the answer "
            f"({stream.details}); the outcome is unknown",
            code=stream.status,
        )
        for operation in stream.unanswered.values():
            if not operation.future.done():
                operation.future.set_exception(error)
        stream.unanswered.clear()

    def _fail_queued(self, error: Exception) -> None:
        queued, self._queued = self._queued, []
        for operation in queued:
            if not operation.future.done():
                operation.future.set_exception(error)


def _name(status: grpc.StatusCode | None) -> str:
    return status.name if status is not None else "UNAVAILABLE"


def _stream_error(stream: _Stream) -> Exception:
    return status_error(stream.status or grpc.StatusCode.UNKNOWN, stream.details)


# Statuses a stream is refused with, before it runs anything, that another try would
# only meet again: they fail the operations waiting for it.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
# google.rpc.Code numbers -> grpc's StatusCode values.
_STATUS = {code.value[0]: code for code in grpc.StatusCode}


_shared: dict[Hashable, Session] = {}


def session_for(key: Hashable, open_channel: Any, metadata: Any) -> Session:
    """The session of `key` (the running loop is added to it), opened with
    `open_channel()` if there is none; the caller is counted as one of its users and
    must `leave` it."""
    key = (asyncio.get_running_loop(), key)
    session = _shared.get(key)
    if session is None or session._closed:
        session = _shared[key] = Session(key, open_channel(), metadata)
    session.users += 1
    return session


async def leave(session: Session) -> None:
    """One user fewer; the last one closes the session."""
    session.users -= 1
    if session.users <= 0:
        if _shared.get(session.key) is session:
            del _shared[session.key]
        await session.close()
