"""Session streams: many lock operations over one long-lived stream (the `Session` RPC).

A unary call costs grpc.aio a few hundred µs of CPU whatever it does; a message on an
open stream costs a fraction of that, and one message may carry many operations. So
a client (the SDK shares one session per address among all its clients) sends what
its tasks ask within one loop turn as one message, and the service answers each
operation on its own, exactly as its unary call: the same code serves both (the
`operation` of each `LeaderElectionServicer` method), with the same checks, answers
and status codes, per operation.

Each operation runs in a task of its own, so the operations of a message run
together: on Redis their scripts go out in one write and come back in one read (the
pipelined connection sends everything a loop turn queued at once); on ScyllaDB and
DynamoDB they run concurrently, at most `MAX_IN_FLIGHT` per stream. Results are sent
as they are ready, every result ready at that moment in one message.

Back-pressure: with `MAX_IN_FLIGHT` operations running or unsent, the stream is not
read until some are answered, and grpc's flow control then holds the client's writes.

A stream ends with a status only for what concerns all of it: OK when the client
half-closes and every operation is answered; UNAUTHENTICATED (or another refusal)
when the caller is refused at the start; UNAVAILABLE when this instance shuts down.
At shutdown a session stops taking operations (one that arrives then is answered
UNAVAILABLE without running), answers those it runs, and ends; a client then opens a
session elsewhere. An operation that never got a result has an unknown outcome for
the client, as a unary call that got no answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextvars import Context
from typing import TYPE_CHECKING, Any

import grpc
from loguru import logger

from quorum_quest._rpc import wire
from quorum_quest.errors import AccessRefused
from quorum_quest.server.servicer import SHUTTING_DOWN, Refusal, _refused

if TYPE_CHECKING:
    from quorum_quest.server.servicer import LeaderElectionServicer, Operation

# Operations one stream may have running or unsent before it stops reading.
MAX_IN_FLIGHT = 10_000
# The initial metadata a session sends before anything else: a client that sees it
# knows the service took the stream (and may have run what it sent since).
SESSION_HEADER = ("quorum-quest-session", "1")
# The oneof field of `SessionOperation` -> the method of `LeaderElectionServicer`
# whose `operation` serves it.
OPERATIONS = ("try_acquire_lock", "keep_alive", "release_lock", "get_leader")
NOT_RUN = "this service instance is shutting down: the operation was not run; ask another"


def _code(status: grpc.StatusCode) -> int:
    code: int = status.value[0]
    return code


class Sessions:
    """The session streams open on this instance, so that shutdown can end them."""

    def __init__(self) -> None:
        self._open: set[SessionStream] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._open)

    def add(self, session: SessionStream) -> None:
        self._open.add(session)

    def discard(self, session: SessionStream) -> None:
        self._open.discard(session)

    def close(self) -> None:
        """Every session stops taking operations, answers those it runs, and ends
        UNAVAILABLE; a session opened from now on ends so at once."""
        self.closed = True
        for session in self._open:
            session.close()


class SessionStream:
    """One `Session` call: reads operations, runs each in its own task, writes results."""

    def __init__(self, servicer: LeaderElectionServicer, context: grpc.aio.ServicerContext) -> None:
        self._servicer = servicer
        self._context = context
        self._operations: dict[str, Operation] = {
            name: getattr(type(servicer), name).operation for name in OPERATIONS
        }
        self._running: dict[int, asyncio.Task[None]] = {}
        self._results: list[Any] = []
        self._room = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._wake = asyncio.Event()
        self._closing = False
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def serve(self, requests: AsyncIterator[Any]) -> None:
        """Serve the stream until the client half-closes (and every operation is
        answered), the client leaves, or this instance shuts down."""
        runtime = self._servicer._runtime
        context = self._context
        if runtime.sessions.closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        access = runtime.current.access
        if access is not None:
            try:
                # Refused credentials end the stream at once; each operation is then
                # authorized (and counted against the call rate) on its own.
                access.caller(context)
            except AccessRefused as exc:
                refusal = _refused(self._servicer._log, context, "session", exc)
                await context.abort(refusal.code, refusal.message)
        await context.send_initial_metadata((SESSION_HEADER,))
        runtime.sessions.add(self)
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        reader.add_done_callback(lambda _: self._wake.set())
        try:
            await self._write_until_done(reader)
        finally:
            runtime.sessions.discard(self)
            reader.cancel()
            for task in list(self._running.values()):
                task.cancel()

    async def _write_until_done(self, reader: asyncio.Task[None]) -> None:
        context = self._context
        while True:
            if self._results:
                results, self._results = self._results, []
                await context.write(wire.SessionResponse(results=results))
                for _ in results:
                    self._room.release()
                continue
            if not self._running:
                if reader.done():
                    reader.result()  # an undecodable message ends the stream with its status
                    return
                if self._closing:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            await self._wake.wait()
            self._wake.clear()

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        loop = asyncio.get_running_loop()
        async for message in requests:
            for operation in message.operations:
                await self._room.acquire()
                if self._closing:
                    self._answer(operation.id, grpc.StatusCode.UNAVAILABLE, NOT_RUN)
                elif operation.id in self._running:
                    self._answer(
                        operation.id,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"id: {operation.id} is the id of an operation still running",
                    )
                else:
                    # Outside the stream's trace (an empty context): a stream lives for
                    # hours, and a sampled one would gather a span of every operation.
                    task = loop.create_task(self._run(operation), context=Context())
                    self._running[operation.id] = task

    def _answer(self, id: int, status: grpc.StatusCode, message: str) -> None:
        self._results.append(wire.SessionResult(id=id, code=_code(status), message=message))
        self._wake.set()

    async def _run(self, operation: Any) -> None:
        id = operation.id
        try:
            kind = operation.WhichOneof("operation")
            if kind is None:
                self._answer(
                    id,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"operation: must be one of {', '.join(OPERATIONS)}",
                )
                return
            request = getattr(operation, kind)
            deadline = self._deadline  # the stream's, if it has one
            if operation.deadline_ms:
                ends = time.monotonic() + operation.deadline_ms / 1000
                deadline = ends if deadline is None else min(deadline, ends)
            left = None if deadline is None else deadline - time.monotonic()
            try:
                async with asyncio.timeout(left):
                    response = await self._operations[kind](
                        self._servicer, request, self._context, deadline
                    )
            except TimeoutError:
                self._answer(id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            except Refusal as refusal:
                self._answer(id, refusal.code, refusal.message)
            except Exception:
                logger.exception("session operation {} failed", kind)
                self._answer(id, grpc.StatusCode.INTERNAL, "the service failed this operation")
            else:
                self._results.append(wire.SessionResult(id=id, **{kind: response}))
                self._wake.set()
        finally:
            del self._running[id]
