"""The raw SQLite the benchmarks measure the log against, and the fast way to fill one.

The same schema and pragmas as events/sqlite.py, driven by `sqlite3` with nothing of ours
around it: what the log could reach if it did only SQLite's part of the work.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec

from events import GENESIS_HASH, Meta, RecordedEvent
from events.envelope import chain_hash, encode_payload, now_rfc3339
from events.sqlite import COLUMNS, SCHEMA
from events.types import TaskCompleted, TaskCreated, TaskOutput, TaskStarted

INSERT = f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"

TASK_EVENTS = 10  # per task stream in `fill`: created, started, 7 outputs, completed


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.executescript(SCHEMA)
    return conn


def rows(path: Path) -> list[tuple]:
    """Every event of the log at `path`, as rows in INSERT's column order."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"SELECT {COLUMNS} FROM events ORDER BY position").fetchall()


def insert(path: Path, rows: list[tuple], per_transaction: int) -> float:
    """Seconds to write `rows` with raw executemany, `per_transaction` rows per durable commit."""
    with contextlib.closing(connect(path, "FULL")) as conn:
        started = time.perf_counter()
        for start in range(0, len(rows), per_transaction):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, rows[start:start + per_transaction])
            conn.execute("COMMIT")
        return time.perf_counter() - started


def _task_rows(count: int) -> Iterator[tuple]:
    """`count` small valid events with correct positions, versions and hash chain."""
    meta = msgspec.json.Encoder(order="sorted").encode(Meta())
    previous = GENESIS_HASH
    recorded_at = now_rfc3339()
    for position in range(1, count + 1):
        task, version = divmod(position - 1, TASK_EVENTS)
        version += 1
        task_id = f"t{task}"
        if version == 1:
            data = TaskCreated(task_id=task_id, type="command", content="echo hi", project_id="p1",
                               created_by="bench")
        elif version == 2:
            data = TaskStarted(task_id=task_id, run_id="r1", agent_id="a1")
        elif version < TASK_EVENTS:
            data = TaskOutput(task_id=task_id, run_id="r1", seq=version, stream="stdout", chunk="hi\n")
        else:
            data = TaskCompleted(task_id=task_id, run_id="r1", result="ok")
        payload = encode_payload(data)
        event = RecordedEvent(
            position=position, stream=f"task-{task_id}", version=version, type=data.event_type,
            payload=msgspec.Raw(payload), meta=msgspec.Raw(meta), recorded_at=recorded_at, hash="",
        )
        previous = chain_hash(previous, event)
        yield (position, event.stream, version, event.type, payload, meta, recorded_at, previous)


def fill(path: str, count: int) -> None:
    """A valid log of `count` events (TASK_EVENTS per task), written raw and fast, with no read
    models. Takes a str, so that it can be the target of a child process."""
    rows = _task_rows(count)
    with contextlib.closing(connect(Path(path), "OFF")) as conn:
        while batch := [row for _, row in zip(range(50_000), rows)]:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, batch)
            conn.execute("COMMIT")


def fold(path: Path) -> tuple[Counter[str], int]:
    """The floor of a replay: a raw scan with untyped decoding, folded into counts by type and
    the characters of output."""
    counts: Counter[str] = Counter()
    chars = 0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for event_type, payload in conn.execute("SELECT type, payload FROM events ORDER BY position"):
            data = msgspec.json.decode(payload)
            counts[event_type] += 1
            if event_type == "task.output":
                chars += len(data["chunk"])
    return counts, chars


def hash_chain(path: Path) -> None:
    """The floor of verify: one raw scan hashing the very bytes the chain covers."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT meta, payload, position, recorded_at, stream, type, version FROM events ORDER BY position"
        )
        for meta, payload, position, recorded_at, stream, type_, version in rows:
            hashlib.sha256(
                b'{"meta":%s,"payload":%s,"position":%d,"recordedAt":"%s","stream":"%s","type":"%s","version":%d}'
                % (meta, payload, position, recorded_at.encode(), stream.encode(), type_.encode(), version)
            ).hexdigest()
