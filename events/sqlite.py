"""The embedded SQLite backend of the log.

Writes go through one writer thread that commits whatever appends are waiting as one
transaction (group commit): one fsync serves many appends. Each append still checks
its own expected version against the stream as the transaction sees it, so a conflict
fails that append alone. The transaction reads the chain's tail itself, so another
process appending to the same file keeps positions and hashes right.
Reads go through aiosqlite connections; WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiosqlite
import msgspec

from events.envelope import (
    GENESIS_HASH, Meta, RecordedEvent, encode_payload, link_hash, now_rfc3339,
)
from events.log import (
    EventLog, IdempotencyConflict, LogClosed, Page, Projector, StorageError, TypeFilter,
    WrongExpectedVersion,
)
from events.types import EventData
from events.verify import Chain

T = TypeVar("T")
logger = logging.getLogger("mission_control.log")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    type TEXT NOT NULL,
    payload BLOB NOT NULL,
    meta BLOB NOT NULL,
    recorded_at TEXT NOT NULL,
    hash TEXT NOT NULL,
    UNIQUE (stream, version)
);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
-- INSERT OR REPLACE deletes the row it collides with without firing the delete trigger.
CREATE TRIGGER IF NOT EXISTS events_no_replace BEFORE INSERT ON events
WHEN EXISTS (SELECT 1 FROM events WHERE position = NEW.position)
  OR EXISTS (SELECT 1 FROM events WHERE stream = NEW.stream AND version = NEW.version)
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    first_position INTEGER NOT NULL,
    last_position INTEGER NOT NULL
);
"""

COLUMNS = "position, stream, version, type, payload, meta, recorded_at, hash"
_canonical = msgspec.json.Encoder(order="sorted")
_type_json = functools.lru_cache(maxsize=None)(_canonical.encode)


class _Append:
    __slots__ = ("stream", "payloads", "expected", "meta", "key", "fingerprint", "future")

    def __init__(self, stream, payloads, expected, meta, key, fingerprint, future):
        self.stream = stream
        self.payloads: list[tuple[str, bytes, int]] = payloads  # (type, payload, schema)
        self.expected: int | None = expected
        self.meta: Meta = meta
        self.key: str | None = key
        self.fingerprint: str | None = fingerprint
        self.future: asyncio.Future = future


class _Outcome:
    """What became of one append of a batch: the events it recorded (`fresh`: written by this
    batch; otherwise an idempotent replay of an earlier append's), or the error refusing it."""

    __slots__ = ("events", "fresh", "error")

    def __init__(self, events: list[RecordedEvent], fresh: bool = True, error: BaseException | None = None):
        self.events, self.fresh, self.error = events, fresh, error

    @classmethod
    def failed(cls, error: BaseException) -> _Outcome:
        return cls([], False, error)


class _Staged(NamedTuple):
    """A batch made ready to write: an outcome per append, and the rows that record them."""

    outcomes: list[_Outcome]
    rows: list[tuple]
    keys: list[tuple]
    """Rows of the idempotency table."""
    versions: dict[str, int]
    """Each stream's version once the rows are written."""
    head: int


def _row(row: tuple) -> RecordedEvent:
    return RecordedEvent(
        position=row[0], stream=row[1], version=row[2], type=row[3],
        payload=msgspec.Raw(row[4]), meta=msgspec.Raw(row[5]), recorded_at=row[6], hash=row[7],
    )


class _Tx:
    """The Transaction a projector sees: the writer's connection, nothing more. The SQLite read
    models (projections/sqlite.py) write through `execute` and `executemany`."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def read_events(self, after: int, until: int, limit: int) -> list[RecordedEvent]:
        rows = self._conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE position > ? AND position <= ? ORDER BY position LIMIT ?",
            (after, until, limit),
        ).fetchall()
        return [_row(r) for r in rows]


def _filters(streams: Sequence[str] | None, types: TypeFilter | None) -> tuple[str, list[Any]]:
    sql, params = [], []
    if streams is not None:  # [] matches nothing
        sql.append(f"stream IN ({','.join('?' * len(streams)) or 'NULL'})")
        params.extend(streams)
    if types is not None:
        alternatives = []
        if types.exact:
            alternatives.append(f"type IN ({','.join('?' * len(types.exact))})")
            params.extend(sorted(types.exact))
        for prefix in types.prefixes:
            alternatives.append("substr(type, 1, ?) = ?")
            params.extend([len(prefix), prefix])
        sql.append("(" + (" OR ".join(alternatives) or "0") + ")")
    return "".join(f" AND {s}" for s in sql), params


def _storage_error(error: BaseException) -> BaseException:
    """sqlite3's errors as the log's StorageError, for callers that know no SQLite (the
    original its cause); the log's own errors, and a projector's, as they are."""
    if isinstance(error, sqlite3.Error):
        translated = StorageError(str(error))
        translated.__cause__ = error
        return translated
    return error


@contextlib.contextmanager
def _translated():
    try:
        yield
    except sqlite3.Error as exc:
        raise _storage_error(exc) from exc


def open_log(url: str, **options) -> SqliteLog:
    """`sqlite:///path`, or a bare path."""
    return SqliteLog(url.removeprefix("sqlite:///"), **options)


class SqliteLog(EventLog):
    backend = "sqlite"
    version_cache_size = 100_000
    """Streams whose version the writer remembers between batches."""

    def __init__(
        self,
        path: str | Path,
        *,
        projector: Projector | None = None,
        durable: bool = True,
        readers: int = 2,
        poll_interval: float = 0.2,
        max_batch: int = 2000,
    ):
        super().__init__()
        self.path = Path(path)
        self.projector = projector
        self.durable = durable
        self.poll_interval = poll_interval
        self.max_batch = max_batch
        self._reader_count = readers
        self._readers: list[aiosqlite.Connection] = []
        self._local: sqlite3.Connection  # the event loop's own, for `query`
        self._next_reader = 0
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mc-log-writer")
        self._conn: sqlite3.Connection | None = None
        self._versions: dict[str, int] = {}  # writer thread only
        self._versions_at = -1
        self._pending: list[_Append] = []
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    # --- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        # Private whatever the umask: the log holds every task and key hash. SQLite gives the
        # -wal and -shm files the mode of the database file, so creating that one 0600 suffices.
        # Only a file that does not exist yet is made here: closing a descriptor of a file this
        # process has open through SQLite would drop SQLite's POSIX locks on it.
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        loop = asyncio.get_running_loop()
        with _translated():
            await loop.run_in_executor(self._writer_thread, self._open_writer)
            for _ in range(self._reader_count):
                reader = await aiosqlite.connect(self.path)
                await reader.execute_fetchall("PRAGMA busy_timeout = 10000")
                await reader.execute_fetchall("PRAGMA query_only = 1")
                self._readers.append(reader)
            # Autocommit: no statement can open a transaction that would pin an old snapshot.
            self._local = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._local.execute("PRAGMA busy_timeout = 1000")
            self._local.execute("PRAGMA query_only = 1")
        self._head = await self.read_head()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="mc-log-writer"),
            asyncio.create_task(self._watch_other_writers(), name="mc-log-watch"),
        ]

    def _open_writer(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'OFF'}")
        conn.executescript(SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        for task in self._tasks:
            if task.get_name() == "mc-log-writer":
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # drains what was accepted before closing
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for reader in self._readers:
            await reader.close()
        self._local.close()
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            await loop.run_in_executor(self._writer_thread, self._conn.close)
        self._writer_thread.shutdown(wait=True)

    # --- appends -----------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Sequence[EventData],
        *,
        expected: int | None = None,
        meta: Meta | None = None,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> list[RecordedEvent]:
        if self._closed:
            raise LogClosed("the log is closed")
        payloads = [(e.event_type, encode_payload(e), e.schema) for e in events]
        if idempotency_key is not None and fingerprint is None:
            digest = hashlib.sha256(stream.encode())
            for event_type, payload, _ in payloads:
                digest.update(b"\0" + event_type.encode() + b"\0" + payload)
            fingerprint = digest.hexdigest()
        future = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Append(stream, payloads, expected, meta or Meta(), idempotency_key, fingerprint, future)
        )
        self._wakeup.set()
        return await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                started = time.perf_counter()
                try:
                    outcomes = await loop.run_in_executor(self._writer_thread, self._commit_batch, batch)
                except Exception as exc:  # the database itself failed: every append in it fails
                    outcomes = [_Outcome.failed(exc)] * len(batch)
                if self.on_batch is not None:
                    with contextlib.suppress(Exception):  # an observer must never stop the writer
                        self.on_batch(len(batch), time.perf_counter() - started)
                committed: list[RecordedEvent] = []
                for append, outcome in zip(batch, outcomes):
                    if outcome.error is None:
                        if outcome.fresh:
                            committed.extend(outcome.events)
                        if not append.future.done():
                            append.future.set_result(outcome.events)
                    elif not append.future.done():
                        append.future.set_exception(_storage_error(outcome.error))
                self._committed(committed)
            if self._closed:
                return

    def _commit_batch(self, batch: list[_Append]) -> list[_Outcome]:
        """Runs on the writer thread. Returns an outcome per append."""
        try:
            return self._commit(batch)
        except _ProjectorFailed:
            # Find the append the projector refuses; the others still commit, each on its own.
            outcomes: list[_Outcome] = []
            for append in batch:
                try:
                    outcomes.append(self._commit([append])[0])
                except Exception as exc:  # this one alone failed; those before it are committed
                    outcomes.append(_Outcome.failed(exc))
            return outcomes

    def _commit(self, batch: list[_Append]) -> list[_Outcome]:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            staged = self._stage(conn, batch)
            if staged.rows:
                conn.executemany(f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", staged.rows)
            if staged.keys:
                conn.executemany("INSERT INTO idempotency VALUES (?,?,?,?)", staged.keys)
            if self.projector is not None and staged.rows:
                fresh = [e for outcome in staged.outcomes if outcome.fresh for e in outcome.events]
                try:
                    self.projector(_Tx(conn), fresh)
                except Exception as exc:
                    if len(batch) > 1:
                        raise _ProjectorFailed from exc
                    conn.execute("ROLLBACK")
                    return [_Outcome.failed(exc)]
            conn.execute("COMMIT")
            self._remember(staged.versions, staged.head)
            return staged.outcomes
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _stage(self, conn: sqlite3.Connection, batch: list[_Append]) -> _Staged:
        tail = conn.execute("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1").fetchone()
        position, previous = tail if tail else (0, GENESIS_HASH)
        if position != self._versions_at:  # another process appended: what we knew may be stale
            self._versions.clear()
        versions: dict[str, int] = {}  # this batch's, merged into self._versions once committed
        recorded_at = now_rfc3339()  # one group commit, one instant
        recorded_at_json = _canonical.encode(recorded_at)
        used_keys: dict[str, tuple[str, list[RecordedEvent]]] = {}
        outcomes: list[_Outcome] = []
        rows: list[tuple] = []
        keys: list[tuple] = []
        for append in batch:
            if append.key is not None:
                earlier = used_keys.get(append.key) or self._recorded_for_key(conn, append.key)
                if earlier is not None:
                    fingerprint, recorded = earlier
                    if fingerprint == append.fingerprint:
                        outcomes.append(_Outcome(recorded, fresh=False))
                    else:
                        outcomes.append(_Outcome.failed(IdempotencyConflict(append.key)))
                    continue
            version = versions.get(append.stream)
            if version is None:
                version = self._versions.get(append.stream)
            if version is None:
                version = conn.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM events WHERE stream = ?", (append.stream,)
                ).fetchone()[0]
            if append.expected is not None and append.expected != version:
                outcomes.append(_Outcome.failed(WrongExpectedVersion(append.stream, append.expected, version)))
                continue
            recorded = []
            stream_json = _canonical.encode(append.stream)
            for event_type, payload, schema in append.payloads:
                position += 1
                version += 1
                meta = _canonical.encode(msgspec.structs.replace(append.meta, schema=schema))
                previous = link_hash(
                    previous, meta, payload, position, recorded_at_json, stream_json, _type_json(event_type), version
                )
                rows.append((position, append.stream, version, event_type, payload, meta, recorded_at, previous))
                recorded.append(RecordedEvent(
                    position=position, stream=append.stream, version=version, type=event_type,
                    payload=msgspec.Raw(payload), meta=msgspec.Raw(meta), recorded_at=recorded_at, hash=previous,
                ))
            versions[append.stream] = version
            if append.key is not None and recorded:
                used_keys[append.key] = (append.fingerprint, recorded)
                keys.append((append.key, append.fingerprint, recorded[0].position, recorded[-1].position))
            outcomes.append(_Outcome(recorded))
        return _Staged(outcomes, rows, keys, versions, position)

    def _remember(self, versions: dict[str, int], head: int) -> None:
        """Stream versions as of `head`, so the next batch need not ask the database for them.
        They are trusted only while the head is still ours: (stream, version) is UNIQUE anyway."""
        if len(self._versions) + len(versions) > self.version_cache_size:
            self._versions.clear()
        self._versions.update(versions)
        self._versions_at = head

    @staticmethod
    def _recorded_for_key(conn: sqlite3.Connection, key: str):
        found = conn.execute(
            "SELECT fingerprint, first_position, last_position FROM idempotency WHERE key = ?", (key,)
        ).fetchone()
        if found is None:
            return None
        rows = conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE position BETWEEN ? AND ? ORDER BY position", found[1:]
        ).fetchall()
        return found[0], [_row(r) for r in rows]

    async def import_recorded(self, events: Iterable[RecordedEvent]) -> int:
        if self._closed:
            raise LogClosed("the log is closed")
        loop = asyncio.get_running_loop()
        with _translated():
            self._committed(await loop.run_in_executor(self._writer_thread, self._import, events))
        return self._head

    def _import(self, events: Iterable[RecordedEvent], chunk: int = 5000) -> list[RecordedEvent]:
        """Runs on the writer thread, in one transaction: a broken event leaves nothing behind.
        Returns the last chunk written, for the tail."""
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            tail = conn.execute("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1").fetchone()
            chain = Chain(*(tail or (0, GENESIS_HASH)), version_of=lambda stream: conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM events WHERE stream = ?", (stream,)
            ).fetchone()[0])
            batch: list[RecordedEvent] = []
            written: list[RecordedEvent] = []
            for event in events:
                chain.extend(event)
                batch.append(event)
                if len(batch) == chunk:
                    self._write_recorded(conn, batch)
                    written, batch = batch, []
            if batch:
                self._write_recorded(conn, batch)
                written = batch
            conn.execute("COMMIT")
            return written
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _write_recorded(self, conn: sqlite3.Connection, batch: list[RecordedEvent]) -> None:
        conn.executemany(f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", [
            (e.position, e.stream, e.version, e.type, bytes(e.payload), bytes(e.meta), e.recorded_at, e.hash)
            for e in batch
        ])
        if self.projector is not None:
            self.projector(_Tx(conn), batch)

    async def transact(self, fn: Callable[[_Tx], T]) -> T:
        """Run fn in a write transaction of its own, serialised with appends (the SQLite read
        models create, refold and rebuild their tables so)."""

        def run() -> T:
            conn = self._conn
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(_Tx(conn))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O)
                    conn.execute("ROLLBACK")
                raise
            return result

        with _translated():
            return await asyncio.get_running_loop().run_in_executor(self._writer_thread, run)

    # --- reads -----------------------------------------------------------------

    def _reader(self) -> aiosqlite.Connection:
        self._next_reader = (self._next_reader + 1) % len(self._readers)
        return self._readers[self._next_reader]

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """A read of the tables kept beside the log (projections/sqlite.py's read models)."""
        # Read models are read by key or by a bounded page: a few microseconds in SQLite, far
        # less than a round trip to a reader thread, and WAL never makes a reader wait.
        try:  # not `_translated()`: this is every read's path, and a context manager costs more than the read
            return self._local.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(exc) from exc

    async def _scan(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        """Reads of the log itself, pages of up to thousands of events: on a reader thread.

        Executed and fetched in one call on that thread: a caller cancelled half-way (a client
        gone) must not leave a stepped statement behind, whose open read transaction would
        pin the connection to an old snapshot and hide every later commit from it."""
        with _translated():
            return list(await self._reader().execute_fetchall(sql, params))

    async def read_head(self) -> int:
        rows = await self.query("SELECT COALESCE(MAX(position), 0) FROM events")
        return rows[0][0]

    async def read_all(self, after=0, limit=500, *, streams=None, types=None, until=None) -> Page:
        if until is None:
            until = await self.read_head()
        where, params = _filters(streams, types)
        rows = await self._scan(
            f"SELECT {COLUMNS} FROM events WHERE position > ? AND position <= ?{where} "
            "ORDER BY position LIMIT ?",
            [after, until, *params, limit],
        )
        events = [_row(r) for r in rows]
        return Page(events, events[-1].position if len(events) == limit else max(after, until))

    async def read_stream(self, stream, after_version=0, *, types=None, until_position=None, limit=None):
        where, params = _filters(None, types)
        if until_position is not None:
            where += " AND position <= ?"
            params.append(until_position)
        rows = await self._scan(
            f"SELECT {COLUMNS} FROM events WHERE stream = ? AND version > ?{where} ORDER BY version LIMIT ?",
            [stream, after_version, *params, -1 if limit is None else limit],
        )
        return [_row(r) for r in rows]

    async def last_event(self, stream: str) -> RecordedEvent | None:
        # One row found by the (stream, version) index: read like the read models, on the loop.
        rows = await self.query(
            f"SELECT {COLUMNS} FROM events WHERE stream = ? ORDER BY version DESC LIMIT 1", (stream,)
        )
        return _row(rows[0]) if rows else None

    async def idempotent(self, key: str):
        rows = await self.query(
            "SELECT fingerprint, first_position, last_position FROM idempotency WHERE key = ?", (key,)
        )
        if not rows:
            return None
        fingerprint, first, last = rows[0]
        page = await self.read_all(first - 1, last - first + 1, until=last)
        return fingerprint, page.events

    async def _watch_other_writers(self) -> None:
        """Another process appending to the same file: its events reach tails within `poll_interval`."""
        reader = await aiosqlite.connect(self.path)
        try:
            last = None
            while True:
                try:
                    ((version,),) = await reader.execute_fetchall("PRAGMA data_version")
                    if version != last:
                        head = await self.read_head()
                        while self._head < head:
                            page = await self.read_all(self._head, self.recent_capacity, until=head)
                            self._committed(page.events)
                        last = version
                except Exception:  # a locked or busy moment: look again, never stop watching
                    logger.warning("could not read the log's head; retrying", exc_info=True)
                await asyncio.sleep(self.poll_interval)
        finally:
            await reader.close()


class _ProjectorFailed(Exception):
    pass
