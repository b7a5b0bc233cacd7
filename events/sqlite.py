"""The embedded SQLite backend of the log.

Writes go through one writer thread that commits whatever appends are waiting as one
transaction (group commit, events/groupcommit.py): one fsync serves many appends. The transaction reads the chain's tail itself, so another
process appending to the same file keeps positions and hashes right.
Reads go through aiosqlite connections; WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from events.envelope import GENESIS_HASH, RecordedEvent
from events.groupcommit import (  # noqa: F401  (_Append: tests/test_log_sqlite.py makes one)
    COLUMNS, GroupCommitLog, _Append, _Outcome, _ProjectorFailed, _Staged, row_event as _row,
)
from events.log import LogClosed, Page, Projector, StorageError, TypeFilter
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

class _Tx:
    """The Transaction a projector sees: the writer's connection, nothing more. The SQLite read
    models (projections/sqlite.py) write through `execute` and `executemany`."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:  # an empty one still prepares its statement, and most of a fold's writes are empty
            self._conn.executemany(sql, rows)

    def read_events(self, after: int, until: int, limit: int) -> list[RecordedEvent]:
        rows = self._conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE position > ? AND position <= ? ORDER BY position LIMIT ?",
            (after, until, limit),
        ).fetchall()
        return [_row(r) for r in rows]


_STREAM_VERSION = "SELECT COALESCE(MAX(version), 0) FROM events WHERE stream = ?"
_STREAM_VERSIONS = (  # of the streams named in a JSON array that have events: one statement for any batch
    "SELECT stream, MAX(version) FROM events WHERE stream IN (SELECT value FROM json_each(?)) GROUP BY stream"
)


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


class SqliteLog(GroupCommitLog):
    backend = "sqlite"
    _storage_error = staticmethod(_storage_error)

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
        super().__init__(projector=projector, max_batch=max_batch)
        self.path = Path(path)
        self.durable = durable
        self.poll_interval = poll_interval
        self._reader_count = readers
        self._readers: list[aiosqlite.Connection] = []
        self._local: sqlite3.Connection  # the event loop's own, for `query`
        self._next_reader = 0
        self._conn: sqlite3.Connection | None = None
        self._tasks: list[asyncio.Task] = []
        self._lock_files: dict[str, int] = {}

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
            # The watcher's connection is made here, not in its task: a task cancelled while aiosqlite
            # connects leaves that connection's thread to answer a loop that may be closed by then.
            self._watcher = await aiosqlite.connect(self.path)
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
        for reader in [*self._readers, self._watcher]:
            await reader.close()
        for descriptor in self._lock_files.values():
            os.close(descriptor)  # gives back a lock still held
        self._local.close()
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            await loop.run_in_executor(self._writer_thread, self._conn.close)
        self._writer_thread.shutdown(wait=True)

    # --- locks shared by the processes on this file ---------------------------------

    async def _acquire(self, name: str) -> None:
        """An exclusive flock on a file beside the database's, `<file>-<name>.lock`: the kernel
        gives it back when the process dies, however it dies."""
        descriptor = self._lock_files.get(name)
        if descriptor is None:
            path = self.path.with_name(f"{self.path.name}-{name}.lock")
            descriptor = self._lock_files[name] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        await asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX)

    async def _release(self, name: str) -> None:
        fcntl.flock(self._lock_files[name], fcntl.LOCK_UN)

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
                try:
                    self.projector(_Tx(conn), staged.fresh())
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
        return self._staged(
            batch, *(tail or (0, GENESIS_HASH)),
            stream_versions=lambda names: dict(conn.execute(_STREAM_VERSIONS, (json.dumps(names),)).fetchall()),
            recorded_for_key=lambda key: self._recorded_for_key(conn, key),
        )

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
                _STREAM_VERSION, (stream,)
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
        return Page.read([_row(r) for r in rows], after, until, limit)

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
        last = None
        while True:
            try:
                ((version,),) = await self._watcher.execute_fetchall("PRAGMA data_version")
                if version != last:
                    head = await self.read_head()
                    while self._head < head:
                        page = await self.read_all(self._head, self.recent_capacity, until=head)
                        self._committed(page.events)
                    last = version
            except Exception:  # a locked or busy moment: look again, never stop watching
                logger.warning("could not read the log's head; retrying", exc_info=True)
            await asyncio.sleep(self.poll_interval)

