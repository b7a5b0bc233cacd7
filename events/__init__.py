"""What happened and the log that keeps it. Imports nothing else of Mission Control."""

import importlib

from events.envelope import (
    GENESIS_HASH, Event, InvalidEvent, Meta, RecordedEvent, UnknownEventType, canonical_json,
    chain_hash, decode, decode_meta, now_rfc3339, parse_rfc3339, rfc3339, typed,
)
from events.log import (
    ANY, NO_STREAM, EventLog, IdempotencyConflict, LogClosed, Page, Projector, StorageError,
    Transaction, TypeFilter, WrongExpectedVersion,
)
from events.types import EVENT_TYPES, EventData

__all__ = [
    "ANY", "EVENT_TYPES", "GENESIS_HASH", "Event", "NO_STREAM", "EventData", "EventLog", "IdempotencyConflict",
    "InvalidEvent", "LogClosed", "Meta", "Page", "Projector", "RecordedEvent", "StorageError",
    "Transaction", "TypeFilter", "UnknownEventType", "WrongExpectedVersion", "canonical_json", "chain_hash",
    "decode", "decode_meta", "now_rfc3339", "open_log", "parse_rfc3339", "rfc3339", "typed",
]


_SCHEMES = {"postgresql": "postgres"}
"""URL schemes named otherwise than their backend's module."""


def open_log(url: str, **options) -> EventLog:
    """The log at `url`: `<backend>://...` is opened by the module events/<backend>.py
    (`postgresql://...` by events/postgres.py), and a bare path names a SQLite file."""
    scheme, separator, _ = url.partition("://")
    backend = _SCHEMES.get(scheme, scheme) if separator else "sqlite"
    return importlib.import_module(f"events.{backend}").open_log(url, **options)
