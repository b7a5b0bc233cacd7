"""The recorded-event envelope, its canonical form and hash, and decoding into types."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

import events.upcasters  # noqa: F401  (registers the upcasters `decode` relies on)
from events.types import EVENT_TYPES, EventData
from events.upcast import upcast

GENESIS_HASH = "0" * 64


class Meta(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=False):
    """Who and what caused an append; stored with every event it wrote."""

    actor: str | None = None
    request_id: str | None = None
    causation_id: str | None = None
    """The log position (as a string) of the event that caused this append, where one did:
    e.g. a webhook attempt names the task event that triggered its delivery. None for an
    append a request or a person caused."""
    schema: int = 1


class RecordedEvent(msgspec.Struct, kw_only=True, rename="camel", frozen=True, gc=False):
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


_encoder = msgspec.json.Encoder(order="sorted")  # keys in code-point order
_in_order = msgspec.json.Encoder()  # keys in the order the dicts hold them


def _mixes_planes(encoded: bytes) -> bool:
    """Whether the UTF-8 holds a character in U+E000-U+FFFF (lead byte EE or EF) and one outside
    the BMP (F0-F4): the only pair whose code-point order differs from RFC 8785's UTF-16 order.
    `int in bytes` is one memchr; a regex, or a bytes needle (a TypeError raised and cleared
    first), costs several times more on the append path."""
    return (0xEE in encoded or 0xEF in encoded) and (
        0xF0 in encoded or 0xF1 in encoded or 0xF2 in encoded or 0xF3 in encoded or 0xF4 in encoded
    )


def _utf16(key: str) -> bytes:
    return key.encode("utf-16-be")


def sort_utf16(value: Any) -> Any:
    """`value` with every object's keys in UTF-16 code-unit order, as RFC 8785 sorts them."""
    if isinstance(value, dict):
        return {key: sort_utf16(value[key]) for key in sorted(value, key=_utf16)}
    if isinstance(value, list):
        return [sort_utf16(item) for item in value]
    return value


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) form for the values events hold: keys sorted by UTF-16 code unit, no
    spaces, UTF-8. msgspec sorts by code point, which agrees unless the text holds both a
    character outside the BMP and one in U+E000-U+FFFF; only then are the keys re-sorted."""
    encoded = _encoder.encode(value)
    if encoded.isascii() or not _mixes_planes(encoded):
        return encoded
    return _in_order.encode(sort_utf16(msgspec.json.decode(encoded)))


def code_point_json(value: Any) -> bytes:
    """The form this log wrote before it followed RFC 8785: keys in code-point order. Kept
    only so that `verify` can name events hashed that way (and `import --rechain` carry them)."""
    return _encoder.encode(value)


def link_hash(
    previous_hash: str, meta: bytes, payload: bytes, position: int, recorded_at: bytes, stream: bytes,
    type_: bytes, version: int,
) -> str:
    """The chain link from parts already in canonical form (`recorded_at`, `stream` and
    `type_` JSON-encoded, `meta` and `payload` canonical): the event's keys in sorted order."""
    canonical = b"".join((
        b'{"meta":', meta, b',"payload":', payload, b',"position":', b"%d" % position,
        b',"recordedAt":', recorded_at, b',"stream":', stream, b',"type":', type_,
        b',"version":', b"%d" % version, b"}",
    ))
    return hashlib.sha256(bytes.fromhex(previous_hash) + canonical).hexdigest()


def chain_hash(previous_hash: str, event: RecordedEvent) -> str:
    """sha256(previous hash + the JCS form of the event without its hash), as API.md defines."""
    encode = _encoder.encode
    return link_hash(
        previous_hash, event.meta, event.payload, event.position, encode(event.recorded_at),
        encode(event.stream), encode(event.type), event.version,
    )


_second: tuple[int, str] = (0, "")
"""The last whole second `now_rfc3339` formatted: a request reads the clock twice or more, and
formatting a datetime costs several times a lookup. One tuple, so threads may share it."""


def now_rfc3339() -> str:
    """Now, as `rfc3339` writes it."""
    global _second
    seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    known, text = _second
    if known != seconds:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text)
    return f"{text}.{nanoseconds // 1000:06d}Z"


def rfc3339(at: datetime, timespec: str = "microseconds") -> str:
    """An instant in UTC as the log writes times (`recordedAt`); `timespec="seconds"` for sentences."""
    return at.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _verifiable_float(literal: str) -> float:
    """Floats (only possible in free-form fields such as `metadata`) must be written as
    json.dumps writes them, or an auditor re-serialising the payload gets another hash."""
    value = float(literal)
    if repr(value) != literal:
        raise ValueError(f"the number {literal} has no canonical form here; send it as a string")
    return value


_validators: dict[type, msgspec.json.Decoder] = {}


def encode_payload(data: EventData) -> bytes:
    """Encode and re-validate an event: Structs do not check constraints on construction."""
    cls = type(data)
    validator = _validators.get(cls)
    if validator is None:
        validator = _validators[cls] = msgspec.json.Decoder(cls, float_hook=_verifiable_float)
    try:
        payload = canonical_json(data)
        validator.decode(payload)
    except (msgspec.ValidationError, msgspec.EncodeError, TypeError, UnicodeEncodeError) as exc:
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


class _Schema(msgspec.Struct):
    schema: int = 1


_schema_decoder = msgspec.json.Decoder(_Schema)  # skips the rest of the meta: replay's hot path
_payload_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}


def decode_meta(event: RecordedEvent) -> Meta:
    return _meta_decoder.decode(event.meta)


def decode(event: RecordedEvent) -> EventData:
    """The typed payload, upcast from the schema it was recorded with to the current one."""
    cls = EVENT_TYPES.get(event.type)
    if cls is None:
        raise UnknownEventType(event)
    schema = _schema_decoder.decode(event.meta).schema
    if schema == cls.schema:
        return _payload_decoders[event.type].decode(event.payload)
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
