"""The lease store in a SQLite file of its own beside the log's (events/sqlite.py), `<log>-leases.db`:
the nodes sharing a data dir share one machine, so its wall clock (Unix seconds) measures the
leases. A file of its own, because a renewal is no part of the log: it takes neither the log's
write lock nor its writer's fsync (WAL, `synchronous = NORMAL`: a power loss may forget the last
renewals, which a start's fresh leases make up for). Writes run on a thread of the store's own,
reads on the event loop with a connection of their own (WAL never makes a reader wait)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from events import StorageError
from events.sqlite import SqliteLog
from service.work.leases import Lapse

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (run_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, deadline REAL NOT NULL);
CREATE INDEX IF NOT EXISTS leases_deadline ON leases (deadline);
CREATE TABLE IF NOT EXISTS heard (desktop_id TEXT PRIMARY KEY, at REAL NOT NULL);
"""
_HEARD = "INSERT INTO heard VALUES (?, ?) ON CONFLICT (desktop_id) DO UPDATE SET at = excluded.at"

Statement = tuple[str, Callable[[float], Sequence]]
"""SQL, and its parameters made of the time it runs at."""


def open_leases(log: SqliteLog) -> SqliteLeases:
    return SqliteLeases(log.path.with_name(f"{log.path.stem}-leases.db"))


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _marks(values: Sequence[str]) -> str:
    return ",".join("?" * len(values))


@contextlib.contextmanager
def _translated():
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(str(exc)) from exc


class SqliteLeases:
    def __init__(self, path: Path):
        self.path = path
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mc-leases")
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None

    async def prepare(self) -> None:
        # Private whatever the umask, as the log's file (a file made here only: see SqliteLog.open).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        with _translated():
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(SCHEMA)
            # Autocommit: no read opens a transaction that would pin an old snapshot.
            self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._reader.execute("PRAGMA query_only = 1")
        self._conn = conn

    async def close(self) -> None:
        self._writer.shutdown(wait=True)
        for conn in (self._conn, self._reader):
            if conn is not None:
                conn.close()

    async def _write(self, *statements: Statement) -> None:
        """The statements in one transaction, on the store's thread."""
        conn = self._conn
        assert conn is not None

        def run() -> None:
            now = time.time()
            with _translated(), conn:  # commits, or rolls back what failed
                conn.execute("BEGIN IMMEDIATE")
                for sql, params in statements:
                    conn.execute(sql, params(now))

        await asyncio.get_running_loop().run_in_executor(self._writer, run)

    async def _read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        assert self._reader is not None
        with _translated():
            return self._reader.execute(sql, params).fetchall()

    async def grant(self, run_id: str, task_id: str, seconds: float) -> None:
        await self._write((
            "INSERT INTO leases VALUES (?, ?, ?) "
            "ON CONFLICT (run_id) DO UPDATE SET deadline = max(deadline, excluded.deadline)",
            lambda now: (run_id, task_id, now + seconds),
        ))

    async def renew(self, desktop_id: str, run_ids: Sequence[str], seconds: float) -> None:
        await self._write((_HEARD, lambda now: (desktop_id, now)), (
            f"UPDATE leases SET deadline = max(deadline, ?) WHERE run_id IN ({_marks(run_ids)}) AND deadline >= ?",
            lambda now: (now + seconds, *run_ids, now),
        ))

    async def drop(self, run_id: str) -> None:
        await self._write(("DELETE FROM leases WHERE run_id = ?", lambda now: (run_id,)))

    async def lapsed(self, run_ids: Sequence[str] | None = None) -> list[Lapse]:
        if run_ids is None:
            rows = await self._read("SELECT run_id, task_id, deadline FROM leases WHERE deadline < ?", (time.time(),))
        elif run_ids:
            rows = await self._read(
                f"SELECT run_id, task_id, deadline FROM leases WHERE run_id IN ({_marks(run_ids)}) AND deadline < ?",
                (*run_ids, time.time()),
            )
        else:
            rows = []
        return [Lapse(run_id, task_id, _utc(deadline)) for run_id, task_id, deadline in rows]

    async def heard(self, desktop_id: str) -> None:
        await self._write((_HEARD, lambda now: (desktop_id, now)))

    async def last_heard(self, desktop_id: str) -> datetime.datetime | None:
        rows = await self._read("SELECT at FROM heard WHERE desktop_id = ?", (desktop_id,))
        return _utc(rows[0][0]) if rows else None

    async def silences(self) -> dict[str, float]:
        now = time.time()
        return {desktop_id: now - at for desktop_id, at in await self._read("SELECT desktop_id, at FROM heard")}
