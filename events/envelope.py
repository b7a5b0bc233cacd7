"""The recorded-event envelope, its canonical form and hash, and decoding into types."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from events.types import EVENT_TYPES, EventData
from events.upcast import upcast

GENESIS_HASH = "0" * 64


class Meta(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=False):
    """Who and what caused an append; stored with every event it wrote."""

    actor: str | None = None
    request_id: str | None = None
    causation_id: str | None = None
    schema: int = 1


class RecordedEvent(msgspec.Struct, kw_only=True, rename="camel", frozen=True):
    """An event as the log keeps and serves it.

    `payload` and `meta` stay raw JSON exactly as recorded, so serving, exporting and
    hashing never re-encode them: what an auditor hashes is what was stored.
    """

    position: int
    stream: str
    version: int
    type: str
    payload: msgspec.Raw
    meta: msgspec.Raw
    recorded_at: str
    hash: str


class _Canonical(msgspec.Struct, rename="camel"):
    """The recorded event without its hash; encoded with sorted keys it is the JCS form."""

    meta: msgspec.Raw
    payload: msgspec.Raw
    position: int
    recorded_at: str
    stream: str
    type: str
    version: int


_encoder = msgspec.json.Encoder(order="sorted")


def canonical_json(value: Any) -> bytes:
    """RFC 8785 form for the values events hold: sorted keys, no spaces, UTF-8."""
    return _encoder.encode(value)


def chain_hash(previous_hash: str, event: RecordedEvent | _Canonical) -> str:
    canonical = _encoder.encode(
        _Canonical(
            meta=event.meta, payload=event.payload, position=event.position,
            recorded_at=event.recorded_at, stream=event.stream, type=event.type,
            version=event.version,
        )
    )
    return hashlib.sha256(bytes.fromhex(previous_hash) + canonical).hexdigest()


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def encode_payload(data: EventData) -> bytes:
    """Encode and re-validate an event: Structs do not check constraints on construction."""
    payload = canonical_json(data)
    try:
        msgspec.json.decode(payload, type=type(data))
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"{data.event_type}: {exc}") from None
    return payload


class UnknownEventType(Exception):
    """The log holds an event type this code does not know (a newer writer, or damage)."""

    def __init__(self, event: RecordedEvent):
        self.event = event
        super().__init__(
            f"event at position {event.position} has type {event.type!r}, which this version "
            "of Mission Control does not know"
        )


class InvalidEvent(ValueError):
    """An event that does not fit its schema; nothing was written."""


_meta_decoder = msgspec.json.Decoder(Meta)


def decode_meta(event: RecordedEvent) -> Meta:
    return _meta_decoder.decode(event.meta)


def decode(event: RecordedEvent) -> EventData:
    """The typed payload, upcast from the schema it was recorded with to the current one."""
    cls = EVENT_TYPES.get(event.type)
    if cls is None:
        raise UnknownEventType(event)
    schema = _meta_decoder.decode(event.meta).schema
    if schema == cls.schema:
        return msgspec.json.decode(event.payload, type=cls)
    return msgspec.convert(upcast(event.type, schema, msgspec.json.decode(event.payload)), cls)


class Event(NamedTuple):
    """A recorded event with its payload decoded into its current type."""

    data: EventData
    position: int
    stream: str
    version: int
    recorded_at: str
    actor: str | None


def typed(event: RecordedEvent) -> Event:
    return Event(
        decode(event), event.position, event.stream, event.version, event.recorded_at,
        _meta_decoder.decode(event.meta).actor,
    )
