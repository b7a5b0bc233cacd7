"""The SQLite log file as an auditor's tests see it, and as an attacker with file access changes it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from events import RecordedEvent
from events.sqlite import COLUMNS
from projections.store import COUNTER_TABLES, MODELS

READ_MODEL_TABLES = (*COUNTER_TABLES, *(m.table for m in MODELS))


def database(data_dir: Path) -> Path:
    return data_dir / "mission-control.db"


def read_models(db: Path) -> dict[str, list[tuple]]:
    """Every read-model table, rows sorted: two logs' models are equal when these are."""
    with sqlite3.connect(db) as conn:
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in READ_MODEL_TABLES}


def recorded(db: Path) -> list[RecordedEvent]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(f"SELECT {COLUMNS} FROM events ORDER BY position").fetchall()
    return [
        RecordedEvent(position=r[0], stream=r[1], version=r[2], type=r[3], payload=msgspec.Raw(r[4]),
                      meta=msgspec.Raw(r[5]), recorded_at=r[6], hash=r[7])
        for r in rows
    ]


def row(event: RecordedEvent) -> tuple:
    return (event.position, event.stream, event.version, event.type, bytes(event.payload), bytes(event.meta),
            event.recorded_at, event.hash)


def tamper(db: Path, *statements: tuple[str, tuple]) -> None:
    """Change the log file as an attacker with file access would: the triggers go first."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'events'")
        for (name,) in triggers.fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        for sql, params in statements:
            conn.execute(sql, params)
    finally:
        conn.close()


def replace_events(db: Path, events: list[RecordedEvent], drop_from: int) -> None:
    """Delete every event from position `drop_from` on and write `events` in their place."""
    tamper(db, ("DELETE FROM events WHERE position >= ?", (drop_from,)),
           *((f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", row(e)) for e in events))


def as_an_older_release_left_it(db: Path, table: str) -> None:
    """The read models as a release that did not keep `table` left them: without it."""
    with sqlite3.connect(db) as conn:
        conn.execute(f"DROP TABLE {table}")
