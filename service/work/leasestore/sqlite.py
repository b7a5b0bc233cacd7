"""The lease store in SQLite tables beside the log's (events/sqlite.py), in the same file: the
nodes sharing a file share one machine, so its wall clock (Unix seconds) measures the leases.
Writes go through the log's writer (SQLite has one writer at a time anyway); reads through its
reading connection."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

from events.sqlite import SqliteLog
from service.work.leases import Lapse

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS leases (run_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, deadline REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS leases_deadline ON leases (deadline)",
    "CREATE TABLE IF NOT EXISTS heard (desktop_id TEXT PRIMARY KEY, at REAL NOT NULL)",
]


def open_leases(log: SqliteLog) -> SqliteLeases:
    return SqliteLeases(log)


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _marks(values: Sequence[str]) -> str:
    return ",".join("?" * len(values))


class SqliteLeases:
    def __init__(self, log: SqliteLog):
        self.log = log

    async def _write(self, sql: str, params: Callable[[float], Sequence]) -> None:
        """One statement in a write transaction, its parameters made of the time it runs at."""
        await self.log.transact(lambda tx: tx.execute(sql, params(time.time())))

    async def prepare(self) -> None:
        def create(tx) -> None:
            for statement in SCHEMA:
                tx.execute(statement)

        await self.log.transact(create)

    async def grant(self, run_id: str, task_id: str, seconds: float) -> None:
        await self._write(
            "INSERT INTO leases VALUES (?, ?, ?) "
            "ON CONFLICT (run_id) DO UPDATE SET deadline = max(deadline, excluded.deadline)",
            lambda now: (run_id, task_id, now + seconds),
        )

    async def renew(self, run_ids: Sequence[str], seconds: float) -> None:
        if run_ids:
            await self._write(
                f"UPDATE leases SET deadline = max(deadline, ?) WHERE run_id IN ({_marks(run_ids)}) AND deadline >= ?",
                lambda now: (now + seconds, *run_ids, now),
            )

    async def drop(self, run_id: str) -> None:
        await self._write("DELETE FROM leases WHERE run_id = ?", lambda now: (run_id,))

    async def lapsed(self, run_ids: Sequence[str] | None = None) -> list[Lapse]:
        if run_ids is None:
            rows = await self.log.query("SELECT run_id, task_id, deadline FROM leases WHERE deadline < ?",
                                        (time.time(),))
        elif run_ids:
            rows = await self.log.query(
                f"SELECT run_id, task_id, deadline FROM leases WHERE run_id IN ({_marks(run_ids)}) AND deadline < ?",
                (*run_ids, time.time()),
            )
        else:
            rows = []
        return [Lapse(run_id, task_id, _utc(deadline)) for run_id, task_id, deadline in rows]

    async def heard(self, desktop_id: str) -> None:
        await self._write(
            "INSERT INTO heard VALUES (?, ?) ON CONFLICT (desktop_id) DO UPDATE SET at = excluded.at",
            lambda now: (desktop_id, now),
        )

    async def last_heard(self, desktop_id: str) -> datetime.datetime | None:
        rows = await self.log.query("SELECT at FROM heard WHERE desktop_id = ?", (desktop_id,))
        return _utc(rows[0][0]) if rows else None

    async def silences(self) -> dict[str, float]:
        now = time.time()
        return {desktop_id: now - at for desktop_id, at in await self.log.query("SELECT desktop_id, at FROM heard")}
