"""Bytes that are not a request are named: the message, and the field where one is to blame."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from quorum_quest._rpc import Undecodable, _decoder, wire

ACQUIRE = "quorum.quest.api.v1.TryAcquireLockRequest"
MANY = "quorum.quest.api.v1.KeepAliveManyRequest"


def decode(message_class: type, data: bytes) -> object:
    return _decoder(message_class.FromString)(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x0a\x02\xff\xfe", f"service: not valid UTF-8 ({ACQUIRE})"),
        (b"\x0a\x01a\x12\x03\xed\xa0\x80", f"domain: not valid UTF-8 ({ACQUIRE})"),
        (b"\x1a\x02\xc0\xaf", f"client_id: not valid UTF-8 ({ACQUIRE})"),
        (b"\x02\x00", f"{ACQUIRE}: cannot be decoded: field number 0 at byte 0"),
        (b"\x0a\x01a\x0f", f"{ACQUIRE}: cannot be decoded: wire type 7 at byte 3"),
        (b"\x0a\x05ab", f"{ACQUIRE}: cannot be decoded: truncated at byte 4"),
        (b"\xff\xff\xff", f"{ACQUIRE}: cannot be decoded: truncated at byte 3"),
        (b"\x20" + b"\xff" * 11, f"{ACQUIRE}: cannot be decoded: a varint longer than 10 bytes"),
        (b"\x0c", f"{ACQUIRE}: cannot be decoded: an end-group without its start at byte 0"),
        (b"\x0b\x13\x1c\x0c", f"{ACQUIRE}: cannot be decoded: an end-group without its start"),
        # Nesting deeper than protobuf allows: the message is named, no field.
        (b"\x0b" * 200 + b"\x0c" * 200, f"{ACQUIRE}: cannot be decoded: the wire format"),
    ],
)
def test_an_undecodable_acquire_names_the_message_or_field(data: bytes, reason: str) -> None:
    request = decode(wire.TryAcquireLockRequest, data)
    assert isinstance(request, Undecodable)
    assert request.reason().startswith(reason), request.reason()


def test_a_bad_string_in_a_repeated_message_is_named_with_its_index() -> None:
    good = wire.LockRef(service="s", domain="d").SerializeToString()
    bad = b"\x0a\x01s\x12\x02\xff\xfe"
    data = b"\x0a\x01c" + b"".join(b"\x12" + bytes([len(m)]) + m for m in (good, good, bad))
    request = decode(wire.KeepAliveManyRequest, data)
    assert isinstance(request, Undecodable)
    assert request.reason() == f"locks[2].domain: not valid UTF-8 ({MANY})"


def test_a_corrupt_nested_message_is_named() -> None:
    request = decode(wire.KeepAliveManyRequest, b"\x12\x02\x0a\x05")
    assert isinstance(request, Undecodable)
    assert request.reason() == f"{MANY}: cannot be decoded: truncated at byte 2 of locks[0]"


def test_a_stock_message_is_named_too() -> None:
    request = decode(health_pb2.HealthCheckRequest, b"\x0a\x02\xff\xfe")
    assert isinstance(request, Undecodable)
    assert request.reason() == "service: not valid UTF-8 (grpc.health.v1.HealthCheckRequest)"


def test_a_request_that_decodes_is_the_message_unknown_fields_and_all() -> None:
    data = wire.TryAcquireLockRequest(service="s", domain="d", client_id="c").SerializeToString()
    request = decode(wire.TryAcquireLockRequest, data + b"\xf8\xff\xff\xff\x0f\x00")
    assert isinstance(request, wire.TryAcquireLockRequest)
    assert (request.service, request.domain, request.client_id) == ("s", "d", "c")


def test_finding_the_culprit_in_a_huge_request_gives_up_within_its_budget() -> None:
    data = b"\x20\x01" * 1_000_000 + b"\x0a\x02\xff\xfe"
    request = decode(wire.TryAcquireLockRequest, data)
    assert isinstance(request, Undecodable)
    assert request.reason() == f"{ACQUIRE}: cannot be decoded: the wire format is corrupt"
