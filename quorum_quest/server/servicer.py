"""The LeaderElectionService: validates each call, runs it on the store, maps the answer.

A store failure is UNAVAILABLE and a passed deadline DEADLINE_EXCEEDED; "held by
someone else" is the only outcome reported as `is_leader=false`. Each call reads
one runtime snapshot and keeps it to the end. Requests and answers are `wire`
(protobuf) messages: see `quorum_quest._rpc`.

A name (service, domain, client_id) is 1 to 256 bytes of UTF-8, not only whitespace,
with no control character: C0, DEL, C1, and the line and paragraph separators U+2028
and U+2029, which would break a log line. At INFO the service logs what operators act
on — a lock lost by a holder it knew, a store failure (repeats counted, see
`ThrottledLog`) — and each grant and release only at DEBUG.

With auth on (`quorum_quest.server.access`) each call is made by a `Caller`: it must be
allowed the lock and the operation (UNAUTHENTICATED / PERMISSION_DENIED otherwise), its
leases are held under its identity, its quotas apply (RESOURCE_EXHAUSTED), and grants,
releases, losses and refusals are *audit lines* at INFO carrying the identity as a
structured field (`audit`, `identity`, `service`, `domain`, `client_id`); refusals are
rate-limited like other repeated lines.

`WatchLeaders` streams are served from the instance's one `WatchHub`
(`quorum_quest.server.watch`): the call validates and authorizes once (a stream counts
once against the call rate), then sends what the hub tells it. It is not counted as a
call in flight on its snapshot, so a reload never waits for streams to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from loguru import logger
from opentelemetry import trace

from quorum_quest import __version__
from quorum_quest._rpc import wire
from quorum_quest.errors import (
    AccessRefused,
    InvalidArgument,
    QuotaExceeded,
    StoreContended,
    StoreUnavailable,
)
from quorum_quest.server.access import ADMIN, LOCK, OPEN, READ, Caller, client_id_of
from quorum_quest.server.identity import CONTROL_CHARACTER
from quorum_quest.server.watch import Change, WatchClosed
from quorum_quest.stores.base import MAX_NAME_BYTES, Acquisition, LockKey
from quorum_quest.telemetry.logging import ThrottledLog
from quorum_quest.telemetry.telemetry import (
    ACQUIRED,
    DENIED,
    ERROR,
    EXHAUSTED,
    FREE,
    GRACE_PERIOD,
    HELD,
    HELD_BY_OTHER,
    NOT_HOLDER,
    RELEASED,
    RENEWED,
)

if TYPE_CHECKING:
    from quorum_quest.server.runtime import Runtime, Snapshot

Request = TypeVar("Request")
Response = TypeVar("Response")
# The result counted in metrics: one per call, or for a batch how many locks had each.
Results = str | Counter[str]
# A handler answers with its response and its results.
Handler = Callable[[Any, "Snapshot", Caller, Request], Awaitable[tuple[Response, Results]]]
Served = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]

NOT_HOLDER_LEASE_MS = -1000  # KeepAlive's "you do not hold this lock"
# The longest an acquire waits for a release (wait_ms), and how long before the
# caller's deadline it stops waiting, to answer in time: a tenth of the time the caller
# gave, between 50 ms and 1 s, so that a busy machine still answers before the deadline.
MAX_WAIT_S = 60.0
WAIT_DEADLINE_MARGIN_S = 0.05
WAIT_DEADLINE_SHARE = 0.1
MAX_WAIT_DEADLINE_MARGIN_S = 1.0
# A waiter tries again this long after the holder's lease is due to end, and
# never sooner than MIN_RETRY_S after its last try.
EXPIRY_SLACK_S = 0.002
MIN_RETRY_S = 0.01
# The time.monotonic() at which the current call's deadline passes (None: no deadline).
_call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "call_deadline", default=None
)
# The most locks one KeepAliveMany may name; more is INVALID_ARGUMENT.
MAX_BATCH_LOCKS = 10_000
# A refused batch logs one line naming at most this many of the locks.
REFUSED_EXAMPLES = 5
# The largest fencing token any store issues or compares (a signed 64-bit integer).
MAX_FENCING_TOKEN = 2**63 - 1
# The status of each refusal for who the caller is.
REFUSED_STATUS = {
    "Unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "PermissionDenied": grpc.StatusCode.PERMISSION_DENIED,
    "QuotaExceeded": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _one(request: object) -> int:
    return 1


class Refusal(Exception):
    """A lock operation ends with this status instead of an answer: a unary call aborts
    with it, a session operation carries it in its result."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Serves one lock operation: (servicer, request, the call's context, its deadline as a
# time.monotonic() value or None) -> response, or raises `Refusal`.
Operation = Callable[[Any, Any, grpc.aio.ServicerContext, "float | None"], Awaitable[Any]]


def _lock_operation(
    operation: str, *, locks: Callable[[Any], int] = _one
) -> Callable[[Handler[Request, Response]], Served[Request, Response]]:
    """Serve `handler` on one snapshot, within the caller's deadline, with errors as statuses.

    Metrics count lock operations: `locks(request)` is how many a failed call counts.
    With auth on, the caller is identified first (see `Access.caller`); with it off every
    call is `OPEN` and costs one attribute test more. The served method's `operation`
    attribute runs the same handler for a session (`quorum_quest.server.session`),
    raising `Refusal` instead of aborting the call.
    """

    def decorate(handler: Handler[Request, Response]) -> Served[Request, Response]:
        async def run(
            self: Any,
            request: Request,
            context: grpc.aio.ServicerContext,
            deadline: float | None,
        ) -> Response:
            snapshot = self._runtime.current
            telemetry = snapshot.telemetry
            backend = snapshot.store.backend
            started = time.perf_counter()
            _call_deadline.set(deadline)
            snapshot.enter()
            try:
                access = snapshot.access
                caller = OPEN if access is None else access.caller(context)
                # A store span only inside a sampled (recording) server span.
                if telemetry.tracing and trace.get_current_span().is_recording():
                    attributes = {
                        "quorum_quest.backend": backend,
                        "quorum_quest.operation": operation,
                    }
                    with telemetry.tracer.start_as_current_span(
                        f"store {operation}", attributes=attributes
                    ):
                        response, result = await handler(self, snapshot, caller, request)
                else:
                    response, result = await handler(self, snapshot, caller, request)
                if isinstance(result, str):
                    telemetry.count(operation, result, backend, started)
                else:
                    for each, times in result.items():
                        if times:
                            telemetry.count(operation, each, backend, started, times)
                return response
            except InvalidArgument as exc:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except AccessRefused as exc:
                result = EXHAUSTED if isinstance(exc, QuotaExceeded) else DENIED
                telemetry.count(operation, result, backend, started, locks(request))
                raise _refused(self._log, context, operation, exc) from None
            except StoreContended as exc:
                # Nothing is in doubt and nothing was granted: the caller may ask again.
                telemetry.count(operation, ERROR, backend, started, locks(request))
                self._log.log("INFO", f"{backend} contended", "store call contended: {}", exc)
                raise Refusal(grpc.StatusCode.ABORTED, str(exc)) from None
            except StoreUnavailable as exc:
                telemetry.store_error(operation, backend)
                telemetry.count(operation, ERROR, backend, started, locks(request))
                # An outage fails every call: the first is logged, the rest counted.
                self._log.log("WARNING", f"{backend} failed", "store call failed: {}", exc)
                raise Refusal(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            except asyncio.CancelledError:
                # grpc.aio cancels the call's task when the caller's deadline passes
                # (the caller then has DEADLINE_EXCEEDED), when the caller cancels, and
                # at shutdown: the store call in flight is abandoned with it. (A session
                # operation is cancelled by its own deadline.)
                telemetry.count(operation, ERROR, backend, started, locks(request))
                raise
            finally:
                snapshot.leave()

        @functools.wraps(handler)
        async def serve(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            try:
                return await run(self, request, context, deadline)
            except Refusal as refusal:
                await context.abort(refusal.code, refusal.message)
                raise AssertionError("unreachable: context.abort raises") from None

        serve.operation = run  # type: ignore[attr-defined]
        return serve

    return decorate


def _refused(
    log: ThrottledLog, context: grpc.aio.ServicerContext, operation: str, exc: AccessRefused
) -> Refusal:
    """`exc`'s status, after an audit line (rate-limited per identity and kind)."""
    kind = type(exc).__name__
    identity = exc.identity or "?"
    log.log(
        "INFO",
        f"refused {kind} {identity}",
        "audit: call refused: {} {} from {}: {}",
        operation,
        kind,
        context.peer(),
        str(exc),
        fields={"audit": "refused", "identity": identity, "operation": operation},
    )
    return Refusal(REFUSED_STATUS[kind], str(exc))


def _audit(
    caller: Caller, event: str, level: str, message: str, *args: object, **fields: object
) -> None:
    """Log a lock transition: with auth on an audit line, at INFO at least, naming the
    identity as a field and in the text; with auth off a plain line at `level`. Either
    way `fields` (service, domain, client_id) are structured fields of the record."""
    if caller.audited:
        if level == "DEBUG":
            level = "INFO"
        logger.bind(audit=event, identity=caller.identity, **fields).opt(depth=1).log(
            level, message + " identity={}", *args, caller.identity
        )
    else:
        # Keyword arguments become the record's fields (loguru's `extra`) only once the
        # level is known to be on; no `bind` or `opt(depth=1)` here: either costs a
        # disabled DEBUG line (every grant and release) twice over.
        logger.log(level, message, *args, **fields)


def _swapped_out(backend: str) -> StoreUnavailable:
    return StoreUnavailable(
        backend, "a configuration reload replaced this store while the call ran; ask again"
    )


def _duration(ms: int) -> dict[str, int]:
    """A `google.protobuf.Duration` of `ms` milliseconds, as its fields: a dict sets a
    message field in half the time a timedelta takes, on every answer."""
    sign = -1 if ms < 0 else 1
    seconds, rest = divmod(abs(ms), 1000)
    return {"seconds": sign * seconds, "nanos": sign * rest * 1_000_000}


def _waited(seconds: float) -> timedelta | None:
    """The `waited` field: unset (zero) unless the call waited."""
    return timedelta(seconds=seconds) if seconds else None


def _name(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if value.isspace():
        raise InvalidArgument(field, "must not be only whitespace")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_NAME_BYTES} bytes of UTF-8")
    # isprintable() (C, and true of nearly every name) spares most calls the search.
    if not value.isprintable() and (found := CONTROL_CHARACTER.search(value)):
        raise InvalidArgument(
            field,
            f"must not contain control characters ({found.group()!r} at {found.start()})",
        )
    return value


def _lock_key(request: Any) -> LockKey:
    return LockKey(_name("service", request.service), _name("domain", request.domain))


def _lock_keys(locks: Sequence[wire.LockRef]) -> list[LockKey]:
    """The batch's keys; a bad one is named with its index, e.g. `locks[3].domain`."""
    if len(locks) > MAX_BATCH_LOCKS:
        raise InvalidArgument("locks", f"at most {MAX_BATCH_LOCKS} per call, got {len(locks)}")
    keys = []
    for index, lock in enumerate(locks):
        try:
            keys.append(_lock_key(lock))
        except InvalidArgument as exc:
            raise InvalidArgument(f"locks[{index}].{exc.field}", exc.reason) from None
    return keys


def _some(keys: list[LockKey]) -> str:
    """The first `REFUSED_EXAMPLES` of `keys` as service/domain, and how many more."""
    shown = ", ".join(f"{key.service}/{key.domain}" for key in keys[:REFUSED_EXAMPLES])
    rest = len(keys) - REFUSED_EXAMPLES
    return f"{shown} and {rest} more" if rest > 0 else shown


# wire.TryAcquireLockRequest, wire.KeepAliveRequest or wire.KeepAliveManyRequest
TtlRequest = Any


def _ttl_ms(snapshot: Snapshot, request: TtlRequest, *, renewal: bool = False) -> int:
    """ttl_ms wins when set; ttl <= 0 means the default. Above the maximum, a grant is an
    error, but a renewal gets the maximum: a lease granted before a reload lowered
    `server.maxTtl` is renewed, shorter, not refused."""
    policy = snapshot.policy
    if request.ttl_ms > 0:
        ttl_ms, field = request.ttl_ms, "ttl_ms"
    elif request.ttl > 0:
        ttl_ms, field = request.ttl * 1000, "ttl"
    else:
        return policy.default_ttl_ms
    if ttl_ms > policy.max_ttl_ms:
        if renewal:
            return policy.max_ttl_ms
        raise InvalidArgument(
            field,
            f"{ttl_ms / 1000:g} s is above the maximum lease of {policy.max_ttl_ms / 1000:g} s",
        )
    return ttl_ms


def _fencing_token(request: wire.ReleaseLockRequest) -> int:
    """The release's fencing token (0: any); every store keeps tokens below 2^63."""
    if request.fencing_token > MAX_FENCING_TOKEN:
        raise InvalidArgument(
            "fencing_token",
            f"{request.fencing_token} is above {MAX_FENCING_TOKEN}: no lease has such a token",
        )
    return request.fencing_token


def _resume(tokens: Sequence[wire.LockToken]) -> dict[LockKey, int]:
    """A resumed watch's last seen token per lock; a bad one is named with its index."""
    if len(tokens) > MAX_BATCH_LOCKS:
        raise InvalidArgument("resume", f"at most {MAX_BATCH_LOCKS} per call, got {len(tokens)}")
    resume = {}
    for index, lock in enumerate(tokens):
        try:
            key = _lock_key(lock)
        except InvalidArgument as exc:
            raise InvalidArgument(f"resume[{index}].{exc.field}", exc.reason) from None
        if lock.fencing_token > MAX_FENCING_TOKEN:
            raise InvalidArgument(
                f"resume[{index}].fencing_token", f"above {MAX_FENCING_TOKEN}: no lease has it"
            )
        resume[key] = lock.fencing_token
    return resume


# The hub's kinds of change (quorum_quest.server.watch) on the wire.
_KINDS = {
    "current": wire.LeaderChange.KIND_CURRENT,
    "granted": wire.LeaderChange.KIND_GRANTED,
    "released": wire.LeaderChange.KIND_RELEASED,
    "expired": wire.LeaderChange.KIND_EXPIRED,
    "lost": wire.LeaderChange.KIND_LOST,
}
SHUTTING_DOWN = "this service instance is shutting down: resume the watch on another"


def _leader_change(change: Change) -> wire.LeaderChange:
    return wire.LeaderChange(
        service=change.key.service,
        domain=change.key.domain,
        kind=_KINDS[change.kind],
        client_id=client_id_of(change.holder),
        fencing_token=change.token,
        remaining=_duration(change.remaining_ms()),
        gap=change.gap,
    )


class LeaderElectionServicer:
    """Serves the contract in `protos/` from the runtime's current snapshot."""

    def __init__(self, runtime: Runtime, log: ThrottledLog) -> None:
        self._runtime = runtime
        self._log = log  # for failures that repeat with every call while they last

    @_lock_operation("acquire")
    async def try_acquire_lock(
        self, snapshot: Snapshot, caller: Caller, request: wire.TryAcquireLockRequest
    ) -> tuple[wire.TryAcquireLockResponse, str]:
        key = _lock_key(request)
        client_id = _name("client_id", request.client_id)
        ttl_ms = _ttl_ms(snapshot, request)
        caller.allow(key, LOCK, "acquire")
        holder = caller.holder(client_id)
        reserved = caller.reserve(key)  # a place under the lease quota while this runs
        result: Acquisition | None = None
        try:
            result = await self._acquire(snapshot, key, holder, ttl_ms)
            waited = 0.0
            if request.wait_ms and not result.acquired and not result.grace:
                result, waited = await self._acquire_after_release(
                    snapshot, key, holder, ttl_ms, result, request.wait_ms
                )
        finally:
            if result is not None and result.acquired:
                caller.leased(key, result.ttl_ms)
            elif reserved or result is not None:
                caller.unleased(key)
        if result.grace:
            # No holder can be trusted until the grace period ends: leader_id stays
            # empty and lease_length says when to ask again.
            self._runtime.note_grace(result.ttl_ms)
            response = wire.TryAcquireLockResponse(
                is_leader=False, lease_length=_duration(result.ttl_ms)
            )
            return response, GRACE_PERIOD
        if not result.acquired:
            response = wire.TryAcquireLockResponse(
                is_leader=False,
                leader_id=client_id_of(result.holder),
                lease_length=_duration(result.ttl_ms),
                waited=_waited(waited),
            )
            return response, HELD_BY_OTHER
        self._runtime.leases.granted(key, holder, result.ttl_ms)
        if not result.refreshed:
            _audit(
                caller,
                "grant",
                "DEBUG",
                "lock acquired: service={} domain={} client_id={} token={} ttl_ms={}",
                key.service,
                key.domain,
                client_id,
                result.token,
                ttl_ms,
                service=key.service,
                domain=key.domain,
                client_id=client_id,
            )
        response = wire.TryAcquireLockResponse(
            is_leader=True,
            fencing_token=result.token,
            lease_length=_duration(result.ttl_ms),
            leader_id=client_id,
            waited=_waited(waited),
        )
        return response, RENEWED if result.refreshed else ACQUIRED

    async def _acquire_after_release(
        self,
        snapshot: Snapshot,
        key: LockKey,
        holder: str,
        ttl_ms: int,
        refused: Acquisition,
        wait_ms: int,
    ) -> tuple[Acquisition, float]:
        """Wait for `key` to be released (through any instance, where the store tells
        releases; else through this one) or its holder's lease to end, then try again.

        Returns the last answer and how long was waited before the attempt that gave it,
        which the caller adds to its send time: the lease cannot have begun earlier.
        """
        started = time.monotonic()
        stop = started + min(wait_ms / 1000, MAX_WAIT_S)
        deadline = _call_deadline.get()
        if deadline is not None:
            margin = WAIT_DEADLINE_SHARE * (deadline - started)
            margin = min(max(margin, WAIT_DEADLINE_MARGIN_S), MAX_WAIT_DEADLINE_MARGIN_S)
            stop = min(stop, deadline - margin)
        releases = self._runtime.releases
        result, waited = refused, 0.0
        if stop > started:
            await snapshot.store.expect_release(key, math.ceil((stop - started) * 1000))
        while (now := time.monotonic()) < stop and not releases.closed:
            holder_left = max(result.ttl_ms / 1000, MIN_RETRY_S) + EXPIRY_SLACK_S
            await releases.wait(key, min(stop - now, holder_left))
            waited = time.monotonic() - started
            result = await self._acquire(snapshot, key, holder, ttl_ms)
            if result.acquired or result.grace:
                break
        return result, waited

    async def _acquire(
        self, snapshot: Snapshot, key: LockKey, holder: str, ttl_ms: int
    ) -> Acquisition:
        """`store.acquire`, unless a reload swapped the store out (then UNAVAILABLE: ask
        again) or the new store's handover lasts (then a grace refusal). A grant that a
        swapped-out store made while the swap happened is given back, never answered."""
        runtime = self._runtime
        store = snapshot.store
        if store is not runtime.current.store:
            raise _swapped_out(store.backend)
        if left := runtime.handover_left_ms():
            return Acquisition.grace_refusal(left)
        result = await store.acquire(key, holder, ttl_ms)
        if result.acquired and store is not runtime.current.store:
            with contextlib.suppress(StoreUnavailable):
                await store.release(key, holder, result.token)
            raise _swapped_out(store.backend)
        return result

    async def _held_by_another_identity(
        self, snapshot: Snapshot, caller: Caller, key: LockKey, client_id: str
    ) -> bool:
        """With auth on, whether the live lease of `key` that the store refused to release
        for this caller has the caller's client_id under another identity: someone reusing
        a client_id that GetLeader showed them. (One more store read, only then.)"""
        if not caller.audited:
            return False
        try:
            holder = await snapshot.store.get_leader(key)
        except StoreUnavailable:
            return False
        return (
            holder is not None
            and holder.client_id != caller.holder(client_id)
            and client_id_of(holder.client_id) == client_id
        )

    @_lock_operation("keep_alive")
    async def keep_alive(
        self, snapshot: Snapshot, caller: Caller, request: wire.KeepAliveRequest
    ) -> tuple[wire.KeepAliveResponse, str]:
        key = _lock_key(request)
        client_id = _name("client_id", request.client_id)
        ttl_ms = _ttl_ms(snapshot, request, renewal=True)
        caller.allow(key, LOCK, "keep-alive")
        holder = caller.holder(client_id)
        result = await snapshot.store.keep_alive(key, holder, ttl_ms)
        if not result.renewed:
            # Only a holder this instance knew is "lost"; anyone else was never leader.
            # (A lease of another identity under this client_id is not this caller's
            # either: "not the holder" too, as KeepAliveMany answers per lock.)
            lost = self._runtime.leases.ended(key, holder)
            caller.unleased(key)
            _audit(
                caller,
                "lost" if lost else "refused",
                "INFO" if lost else "DEBUG",
                "{}: keep-alive refused, service={} domain={} client_id={}",
                "lock lost" if lost else "not the holder",
                key.service,
                key.domain,
                client_id,
                service=key.service,
                domain=key.domain,
                client_id=client_id,
            )
            response = wire.KeepAliveResponse(lease_length=_duration(NOT_HOLDER_LEASE_MS))
            return response, NOT_HOLDER
        self._runtime.leases.granted(key, holder, ttl_ms)
        caller.leased(key, ttl_ms)
        response = wire.KeepAliveResponse(
            lease_length=_duration(ttl_ms), fencing_token=result.token
        )
        return response, RENEWED

    @_lock_operation("keep_alive_many", locks=lambda request: len(request.locks))
    async def keep_alive_many(
        self, snapshot: Snapshot, caller: Caller, request: wire.KeepAliveManyRequest
    ) -> tuple[wire.KeepAliveManyResponse, Results]:
        client_id = _name("client_id", request.client_id)
        keys = _lock_keys(request.locks)
        ttl_ms = _ttl_ms(snapshot, request, renewal=True)
        caller.allow_all(keys, LOCK, "keep-alive")
        holder = caller.holder(client_id)
        renewals = await snapshot.store.keep_alive_many(keys, holder, ttl_ms)
        leases = self._runtime.leases
        refused, lost = 0, []
        for key, renewal in zip(keys, renewals, strict=True):
            if renewal.renewed:
                leases.granted(key, holder, ttl_ms)
                caller.leased(key, ttl_ms)
            else:
                refused += 1
                caller.unleased(key)
                if leases.ended(key, holder):
                    lost.append(key)
        if lost:
            # One line per batch, not per lock: a client can hold thousands of locks.
            _audit(
                caller,
                "lost",
                "INFO",
                "locks lost: keep-alive refused for {} of {} locks, client_id={}: {}",
                len(lost),
                len(keys),
                client_id,
                _some(lost),
                client_id=client_id,
            )
        response = wire.KeepAliveManyResponse(
            lease_length=_duration(ttl_ms),
            fencing_tokens=[renewal.token if renewal.renewed else 0 for renewal in renewals],
        )
        return response, Counter({RENEWED: len(keys) - refused, NOT_HOLDER: refused})

    @_lock_operation("release")
    async def release_lock(
        self, snapshot: Snapshot, caller: Caller, request: wire.ReleaseLockRequest
    ) -> tuple[wire.ReleaseLockResponse, str]:
        key = _lock_key(request)
        client_id = _name("client_id", request.client_id)
        token = _fencing_token(request)
        caller.allow(key, LOCK, "release")
        holder = caller.holder(client_id)
        released = await snapshot.store.release(key, holder, token)
        if not released:
            if await self._held_by_another_identity(snapshot, caller, key, client_id):
                raise caller.denied_lease(key, "release")
            return wire.ReleaseLockResponse(released=False), NOT_HOLDER
        self._runtime.leases.ended(key, holder)
        caller.unleased(key)
        self._runtime.releases.released(key)
        _audit(
            caller,
            "release",
            "DEBUG",
            "lock released: service={} domain={} client_id={}",
            key.service,
            key.domain,
            client_id,
            service=key.service,
            domain=key.domain,
            client_id=client_id,
        )
        return wire.ReleaseLockResponse(released=True), RELEASED

    @_lock_operation("get_leader")
    async def get_leader(
        self, snapshot: Snapshot, caller: Caller, request: wire.GetLeaderRequest
    ) -> tuple[wire.GetLeaderResponse, str]:
        key = _lock_key(request)
        caller.allow(key, READ, "read")
        grace_ms = await snapshot.store.check_state()
        self._runtime.note_grace(grace_ms)
        if grace_ms:
            response = wire.GetLeaderResponse(
                has_leader=False, grace_remaining=timedelta(milliseconds=grace_ms)
            )
            return response, GRACE_PERIOD
        holder = await snapshot.store.get_leader(key)
        if holder is None:
            return wire.GetLeaderResponse(has_leader=False), FREE
        response = wire.GetLeaderResponse(
            has_leader=True,
            client_id=client_id_of(holder.client_id),
            fencing_token=holder.token,
            remaining=timedelta(milliseconds=holder.remaining_ms),
        )
        return response, HELD

    async def get_status(
        self, request: wire.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> wire.GetStatusResponse:
        runtime = self._runtime
        access = runtime.current.access
        if access is not None:
            try:
                access.caller(context).allow(None, ADMIN, "read the status of")
            except AccessRefused as exc:
                refusal = _refused(self._log, context, "status", exc)
                await context.abort(refusal.code, refusal.message)
        return wire.GetStatusResponse(
            version=__version__,
            backend=runtime.current.store.backend,
            uptime=timedelta(seconds=time.monotonic() - runtime.started),
            held_leases=len(runtime.leases),
            last_reload=runtime.last_reload,
            store_reachable=runtime.store_reachable,
            grace_remaining=timedelta(milliseconds=runtime.grace_left_ms()),
        )

    async def session(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        """Lock operations over one stream: see `quorum_quest.server.session`."""
        # Imported here: the session module serves through this one's operations.
        from quorum_quest.server.session import SessionStream

        await SessionStream(self, context).serve(requests)

    async def watch_leaders(
        self, request: wire.WatchLeadersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wire.LeaderChange]:
        """The state of each watched lock, then every change, until the caller leaves or
        this instance shuts down (UNAVAILABLE)."""
        runtime = self._runtime
        snapshot = runtime.current
        telemetry = snapshot.telemetry
        backend = snapshot.store.backend
        started = time.perf_counter()
        try:
            access = snapshot.access
            caller = OPEN if access is None else access.caller(context)
            keys = _lock_keys(request.locks)
            service = _name("service", request.service) if request.service else None
            if not keys and service is None:
                raise InvalidArgument("locks", "name at least one lock, or a service")
            resume = _resume(request.resume)
            caller.allow_all(keys, READ, "watch")
            if service is not None:
                caller.allow_service(service, READ, "watch")

            def allowed(key: LockKey) -> bool:
                # The rules in force now: a reload that takes `read` away stops reports.
                now = runtime.current.access
                return now is None or (
                    caller.audited and now.rules.allows(caller.identity, key, READ)
                )

            watch = await runtime.watches.open(keys, service, resume, allowed)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AccessRefused as exc:
            result = EXHAUSTED if isinstance(exc, QuotaExceeded) else DENIED
            telemetry.count("watch", result, backend, started)
            refusal = _refused(self._log, context, "watch", exc)
            await context.abort(refusal.code, refusal.message)
        except WatchClosed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        except StoreUnavailable as exc:
            telemetry.store_error("watch", backend)
            telemetry.count("watch", ERROR, backend, started)
            self._log.log("WARNING", f"{backend} failed", "store call failed: {}", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except NotImplementedError as exc:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(exc))
        telemetry.count("watch", "opened", backend, started)
        try:
            async for change in watch.changes():
                yield _leader_change(change)
        except WatchClosed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            runtime.watches.leave(watch)
