"""The server's protobuf (`wire`) messages and the SDK's betterproto2 (`pb`) messages are
one wire format: every message, with every field set, survives a trip through both."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from quorum_quest._rpc import METHODS, SERVICE_NAME, pb, wire
from quorum_quest.api.google_proto_descriptor_pool import default_google_proto_descriptor_pool

PROTO_FILE = default_google_proto_descriptor_pool.FindServiceByName(SERVICE_NAME).file
MESSAGE_NAMES = sorted(PROTO_FILE.message_types_by_name)
# Values at the edges of each scalar type, so a width or signedness mismatch shows.
SCALARS = {
    FieldDescriptor.TYPE_STRING: "ünïcode/ключ",
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_UINT64: 2**64 - 1,
    FieldDescriptor.TYPE_UINT32: 2**32 - 1,
    FieldDescriptor.TYPE_INT32: -(2**31),
}


def _value(field: FieldDescriptor, pick: int) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _filled(field.message_type, pick)
    if field.type == FieldDescriptor.TYPE_ENUM:  # the highest value: the last one added
        return max(value.number for value in field.enum_type.values)
    return SCALARS[field.type]


def _filled(descriptor: Descriptor, pick: int = 0) -> dict[str, Any]:
    """Every field of `descriptor` set to a non-default value (two items for a list);
    of each oneof only one field, the `pick`th (modulo its size)."""
    if descriptor.full_name == "google.protobuf.Duration":
        return {"seconds": -3, "nanos": -500_000_000}
    values: dict[str, Any] = {}
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.fields[pick % len(oneof.fields)] is not field:
            continue
        value = _value(field, pick)
        values[field.name] = [value, value] if field.is_repeated else value
    return values


def _set_fields(descriptor: Descriptor) -> int:
    """How many fields `_filled` sets: all but the oneofs' others."""
    return len(descriptor.fields) - sum(len(o.fields) - 1 for o in descriptor.oneofs)


# Enough picks to set each field of the largest oneof once.
PICKS = range(
    max(
        (
            len(oneof.fields)
            for message in PROTO_FILE.message_types_by_name.values()
            for oneof in message.oneofs
        ),
        default=1,
    )
)


def _same(sent: Any, received: Any) -> bool:
    """Whether the protobuf message `sent` and the betterproto2 `received` hold one value."""
    for field in sent.DESCRIPTOR.fields:
        if field.containing_oneof is not None and not sent.HasField(field.name):
            continue  # another field of its oneof is the one set
        mine, theirs = getattr(sent, field.name), getattr(received, field.name)
        if field.message_type is None:
            same = list(mine) == list(theirs) if field.is_repeated else mine == theirs
        elif field.message_type.full_name == "google.protobuf.Duration":
            same = mine.ToTimedelta() == theirs
        elif field.is_repeated:
            same = len(mine) == len(theirs) and all(map(_same, mine, theirs))
        else:
            same = _same(mine, theirs)
        if not same:
            return False
    return True


@pytest.mark.parametrize("pick", PICKS)
@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_what_the_server_encodes_the_sdk_decodes(name: str, pick: int) -> None:
    wire_class = getattr(wire, name)
    sent = wire_class(**_filled(wire_class.DESCRIPTOR, pick))
    assert len(sent.ListFields()) == _set_fields(wire_class.DESCRIPTOR)
    assert _same(sent, getattr(pb, name).FromString(sent.SerializeToString()))


@pytest.mark.parametrize("pick", PICKS)
@pytest.mark.parametrize("name", [m.request.__name__ for m in METHODS])
def test_what_the_sdk_encodes_the_server_decodes(name: str, pick: int) -> None:
    # Requests carry no Duration: the SDK's encoder only meets scalars and messages.
    wire_class = getattr(wire, name)
    sent = getattr(pb, name).from_dict(_filled(wire_class.DESCRIPTOR, pick))
    received = wire_class.FromString(bytes(sent))
    assert len(received.ListFields()) == _set_fields(wire_class.DESCRIPTOR)
    assert _same(received, sent)


def test_the_method_table_has_wire_messages_for_every_rpc() -> None:
    for method in METHODS:
        for message in (method.request, method.response):
            assert getattr(wire, message.__name__).DESCRIPTOR.full_name == (
                f"quorum.quest.api.v1.{message.__name__}"
            )


def test_an_unknown_message_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchMessage"):
        wire.NoSuchMessage  # noqa: B018
