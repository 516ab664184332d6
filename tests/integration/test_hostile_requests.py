"""Hostile requests get a clear status, never UNKNOWN, and never a traceback or a forged log line.

A corpus of raw request bodies — undecodable bytes, invalid UTF-8 in every string field,
control characters in names, well-formed oddities — is sent as bytes, exactly as they
are, to the service run as users run it (`python -m quorum_quest.cli -config=FILE`), on
the memory store and on Redis, with its log at DEBUG. Each case names the status it must
get and what its details must say. Then the log must hold no traceback, no ERROR and no
line that is not a record of its own, and the refused requests must have been logged a
few lines at a time, not one each.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from quorum_quest._rpc import wire
from quorum_quest.telemetry.logging import SUMMARY_INTERVAL_S
from tests.integration.test_reload_safety import Service

CALL_TIMEOUT_S = 30.0  # generous: the suite must pass on a loaded 2-core machine
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}")

LOCKS = "/quorum.quest.api.v1.LeaderElectionService/"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT

# Each method: its request message and the message's string fields, by field number.
STRING_FIELDS: dict[str, tuple[str, dict[str, int]]] = {
    "TryAcquireLock": ("TryAcquireLockRequest", {"service": 1, "domain": 2, "client_id": 3}),
    "ReleaseLock": ("ReleaseLockRequest", {"service": 1, "domain": 2, "client_id": 3}),
    "KeepAlive": ("KeepAliveRequest", {"service": 1, "domain": 2, "client_id": 3}),
    "GetLeader": ("GetLeaderRequest", {"service": 1, "domain": 2}),
    "KeepAliveMany": ("KeepAliveManyRequest", {"client_id": 1}),
    "GetStatus": ("GetStatusRequest", {}),
}
BAD_UTF8 = {"ff fe": b"\xff\xfe", "lone surrogate": b"\xed\xa0\x80", "overlong": b"\xc0\xaf"}
UNDECODABLE = {
    "garbage": b"\xff\xff\xff\xff",
    "truncated": b"\x0a\x05ab",
    "field number 0": b"\x02\x00",
    "wire type 7": b"\x0f",
    "wire type 6": b"\x0e",
    "varint of 11 bytes": b"\x20" + b"\xff" * 11,
    "end-group without start": b"\x0c",
    "groups nested 200 deep": b"\x0b" * 200 + b"\x0c" * 200,
}
# Names no client sends but a hostile or broken one may.
CONTROL = {
    "newline": "x\nINFO fake log line",
    "carriage return": "x\rINFO fake",
    "NUL": "a\x00b",
    "escape sequence": "\x1b[31mred",
    "DEL": "a\x7f",
    "C1 next line": "a\x85b",
    "line separator": "a\u2028b",
    "tab": "a\tb",
}
BLANK = {"space": " ", "spaces and tab": "  \t "}


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    body: bytes
    code: grpc.StatusCode
    details: tuple[str, ...] = ()  # each must be in the status details
    shape: str = "unary"  # or "server stream" (Watch), "bidi stream" (reflection)


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2), for fields under 128 bytes."""
    return bytes([number << 3 | 2, len(payload)]) + payload


def good(method: str, domain: str = "hostile") -> bytes:
    """A well-formed request of `method`; a case appends a bad field to it."""
    message, fields = STRING_FIELDS[method]
    names = {"service": "svc", "domain": domain, "client_id": "c"}
    present = {name: value for name, value in names.items() if name in fields}
    extra = {"TryAcquireLock": {"ttl": 5}}.get(method, {})
    return getattr(wire, message)(**present, **extra).SerializeToString()


def corpus() -> list[Case]:
    cases: list[Case] = []
    for method, (message, fields) in STRING_FIELDS.items():
        full = f"quorum.quest.api.v1.{message}"
        for kind, body in UNDECODABLE.items():
            if not fields and kind == "field number 0":
                # protobuf (upb) reads it as an unknown field of a message without fields
                cases.append(Case(f"{method}: {kind}", LOCKS + method, body, OK))
                continue
            cases.append(Case(f"{method}: {kind}", LOCKS + method, body, INVALID, (full,)))
        for name, number in fields.items():
            for kind, raw in BAD_UTF8.items():
                body = good(method) + field(number, raw)
                cases.append(
                    Case(f"{method}.{name}: {kind}", LOCKS + method, body, INVALID, (name, full))
                )
    many = "quorum.quest.api.v1.KeepAliveManyRequest"
    for name, number in {"service": 1, "domain": 2}.items():
        for kind, raw in BAD_UTF8.items():
            lock = field(1, b"s") + field(2, b"d") + field(number, raw)
            body = (
                good("KeepAliveMany") + field(2, field(1, b"s") + field(2, b"d")) + field(2, lock)
            )
            cases.append(
                Case(
                    f"KeepAliveMany.locks[1].{name}: {kind}",
                    LOCKS + "KeepAliveMany",
                    body,
                    INVALID,
                    (f"locks[1].{name}", many),
                )
            )
    for method, shape in (("Check", "unary"), ("Watch", "server stream")):
        full = "grpc.health.v1.HealthCheckRequest"
        for kind, body in UNDECODABLE.items():
            cases.append(
                Case(f"health {method}: {kind}", HEALTH + method, body, INVALID, (full,), shape)
            )
        for kind, raw in BAD_UTF8.items():
            cases.append(
                Case(
                    f"health {method}.service: {kind}",
                    HEALTH + method,
                    field(1, raw),
                    INVALID,
                    ("service", full),
                    shape,
                )
            )
    full = "grpc.reflection.v1alpha.ServerReflectionRequest"
    for kind, body in UNDECODABLE.items():
        cases.append(Case(f"reflection: {kind}", REFLECTION, body, INVALID, (full,), "bidi stream"))
    for name, number in {"host": 1, "file_containing_symbol": 4, "list_services": 7}.items():
        for kind, raw in BAD_UTF8.items():
            cases.append(
                Case(
                    f"reflection.{name}: {kind}",
                    REFLECTION,
                    field(number, raw),
                    INVALID,
                    (name, full),
                    "bidi stream",
                )
            )
    for method, (message, fields) in STRING_FIELDS.items():
        for name in fields:
            for kind, value in {**CONTROL, **BLANK}.items():
                body = getattr(wire, message).FromString(good(method))
                setattr(body, name, value)
                cases.append(
                    Case(
                        f"{method}.{name}: {kind}",
                        LOCKS + method,
                        body.SerializeToString(),
                        INVALID,
                        (f"{name}: ",),
                    )
                )
    for kind, value in CONTROL.items():
        lock = wire.LockRef(service="svc", domain=value)
        body = wire.KeepAliveManyRequest(client_id="c", locks=[lock]).SerializeToString()
        cases.append(
            Case(
                f"KeepAliveMany.locks[0].domain: {kind}",
                LOCKS + "KeepAliveMany",
                body,
                INVALID,
                ("locks[0].domain: ",),
            )
        )
    cases.extend(oddities())
    return cases


def oddities() -> Iterable[Case]:
    """Well-formed requests at the edges: answered as the contract says."""
    acquire = LOCKS + "TryAcquireLock"
    yield Case("TryAcquireLock: empty body", acquire, b"", INVALID, ("service: must not be empty",))
    yield Case("KeepAliveMany: empty body", LOCKS + "KeepAliveMany", b"", INVALID, ("client_id: ",))
    yield Case("GetStatus: empty body", LOCKS + "GetStatus", b"", OK)
    yield Case(
        "TryAcquireLock: unknown fields, one of the largest field number",
        acquire,
        good("TryAcquireLock", "unknown-fields") + b"\xa0\x06\x01" + b"\xf8\xff\xff\xff\x0f\x00",
        OK,
    )
    yield Case(
        "TryAcquireLock: a name of 257 bytes",
        acquire,
        wire.TryAcquireLockRequest(
            service="s" * 257, domain="d", client_id="c"
        ).SerializeToString(),
        INVALID,
        ("service: must be at most 256 bytes",),
    )
    yield Case(
        "TryAcquireLock: ttl_ms of 2^32-1",
        acquire,
        wire.TryAcquireLockRequest(
            service="s", domain="d", client_id="c", ttl_ms=2**32 - 1
        ).SerializeToString(),
        INVALID,
        ("ttl_ms: ",),
    )
    yield Case(
        "ReleaseLock: fencing token 2^64-1",
        LOCKS + "ReleaseLock",
        wire.ReleaseLockRequest(
            service="s", domain="d", client_id="c", fencing_token=2**64 - 1
        ).SerializeToString(),
        INVALID,
        ("fencing_token: ",),
    )
    yield Case(
        "KeepAliveMany: 10,001 locks",
        LOCKS + "KeepAliveMany",
        wire.KeepAliveManyRequest(
            client_id="c", locks=[wire.LockRef(service="s", domain=str(i)) for i in range(10_001)]
        ).SerializeToString(),
        INVALID,
        ("locks: at most 10000",),
    )
    yield Case(
        "a body over 4 MiB",
        acquire,
        wire.TryAcquireLockRequest(
            service="s" * 2**22, domain="d", client_id="c"
        ).SerializeToString(),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    yield Case("an unknown method", LOCKS + "StealLock", b"", grpc.StatusCode.UNIMPLEMENTED)
    yield Case("an unknown service", "/evil.Service/Do", b"\xff", grpc.StatusCode.UNIMPLEMENTED)
    yield Case("health List", HEALTH + "List", b"", grpc.StatusCode.UNIMPLEMENTED)
    yield Case(
        "health List: garbage", HEALTH + "List", b"\xff\xff", INVALID, ("HealthListRequest",)
    )
    yield Case(
        "health Check of an unknown service",
        HEALTH + "Check",
        field(1, b"no.such.Service"),
        grpc.StatusCode.NOT_FOUND,
    )
    yield Case("reflection: an empty request", REFLECTION, b"", OK, (), "bidi stream")


CORPUS = corpus()


async def answer(channel: grpc.aio.Channel, case: Case) -> tuple[grpc.StatusCode, str]:
    """The status `case` gets, its body sent as it is."""
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    try:
        if case.shape == "unary":
            await channel.unary_unary(case.method, **raw)(case.body, timeout=CALL_TIMEOUT_S)
        elif case.shape == "server stream":
            async for _ in channel.unary_stream(case.method, **raw)(
                case.body, timeout=CALL_TIMEOUT_S
            ):
                pass
        else:
            async for _ in channel.stream_stream(case.method, **raw)(
                iter([case.body]), timeout=CALL_TIMEOUT_S
            ):
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_every_hostile_request_gets_a_clear_status_and_no_traceback(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    store = request.getfixturevalue("redis_store_config") if backend == "redis" else {}
    config = {
        "backend": {"type": backend},
        "store": store,
        "server": {"stateLossGrace": 0, "shutdownGrace": 2, "healthInterval": 0.5},
        "logger": {"level": "DEBUG"},
    }
    service = Service(tmp_path, config)
    failures = []
    started = time.monotonic()
    try:
        await service.start()
        options = [("grpc.max_send_message_length", 16 * 2**20)]
        async with grpc.aio.insecure_channel(service.address, options=options) as channel:
            for case in CORPUS:
                code, details = await answer(channel, case)
                if code != case.code or not all(part in details for part in case.details):
                    failures.append(f"{case.name}: {code.name} {details!r}")
    finally:
        service.stop()
    elapsed = time.monotonic() - started
    refused = sum(case.code is not OK for case in CORPUS)
    print(
        f"\n{backend}: {len(CORPUS)} hostile requests tried, {refused} to be refused with a"
        f" clear status, {len(CORPUS) - refused} answered; {len(failures)} failures"
    )
    assert not failures, "\n".join(failures)

    log = service.log.read_text(errors="replace")
    assert "Traceback" not in log, service.tail()
    records = log.splitlines()
    assert all(RECORD_START.match(line) for line in records), [
        line for line in records if not RECORD_START.match(line)
    ][:5]
    assert not [line for line in records if " ERROR " in line], service.tail()
    # Over a hundred undecodable requests: logged once, then counted, a line per interval
    # at most, and the count written at shutdown.
    refused_lines = [line for line in records if "bad request refused" in line]
    assert 1 <= len(refused_lines) <= 2 + elapsed / SUMMARY_INTERVAL_S, refused_lines


async def test_a_forged_log_line_is_refused_and_never_written(tmp_path: Path) -> None:
    """The issue's example: a domain carrying a log line of its own."""
    config = {"server": {"stateLossGrace": 0, "shutdownGrace": 2}, "logger": {"level": "DEBUG"}}
    service = Service(tmp_path, config)
    try:
        await service.start()
        async with grpc.aio.insecure_channel(service.address) as channel:
            body = wire.TryAcquireLockRequest(
                service="svc", domain="x\nINFO fake log line", client_id="c"
            ).SerializeToString()
            case = Case("forged", LOCKS + "TryAcquireLock", body, INVALID, ("domain: ",))
            code, details = await answer(channel, case)
    finally:
        service.stop()
    assert code == INVALID and details.startswith("domain: must not contain control"), details
    assert not [
        line for line in service.log.read_text().splitlines() if line.startswith("INFO fake")
    ]
