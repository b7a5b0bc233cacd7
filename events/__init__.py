"""What happened and the log that keeps it. Imports nothing else of Mission Control."""

from events.envelope import (
    GENESIS_HASH, Event, InvalidEvent, Meta, RecordedEvent, UnknownEventType, canonical_json,
    chain_hash, decode, decode_meta, now_rfc3339, typed,
)
from events.log import (
    ANY, NO_STREAM, EventLog, IdempotencyConflict, LogClosed, Page, Projector, Transaction,
    TypeFilter, WrongExpectedVersion,
)
from events.types import EVENT_TYPES, EventData

__all__ = [
    "ANY", "EVENT_TYPES", "GENESIS_HASH", "Event", "NO_STREAM", "EventData", "EventLog", "IdempotencyConflict",
    "InvalidEvent", "LogClosed", "Meta", "Page", "Projector", "RecordedEvent", "Transaction",
    "TypeFilter", "UnknownEventType", "WrongExpectedVersion", "canonical_json", "chain_hash",
    "decode", "decode_meta", "now_rfc3339", "open_log", "typed",
]


def open_log(url: str, **options) -> EventLog:
    """The log at `url`: a path to a SQLite file (or `sqlite:///path`)."""
    from events.sqlite import SqliteLog

    return SqliteLog(url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url, **options)
