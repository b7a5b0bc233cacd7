"""The lease store in PostgreSQL tables beside the log's (events/postgres.py), in the same
database: deadlines are computed and compared by the database's clock (clock_timestamp()), one
for every machine, so a node whose clock is skewed cannot lapse a lease early. Every write is one
autocommit statement on the log's readers, which never takes the log's head lock: a renewal does
not wait for appends, nor they for it."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from events.postgres import PostgresLog
from service.work.leases import Lapse

SCHEMA = [
    'CREATE TABLE IF NOT EXISTS leases (run_id TEXT COLLATE "C" PRIMARY KEY, task_id TEXT NOT NULL, '
    "deadline TIMESTAMPTZ NOT NULL)",
    "CREATE INDEX IF NOT EXISTS leases_deadline ON leases (deadline)",
    'CREATE TABLE IF NOT EXISTS heard (desktop_id TEXT COLLATE "C" PRIMARY KEY, at TIMESTAMPTZ NOT NULL)',
]
_FROM_NOW = "clock_timestamp() + make_interval(secs => %s)"
_HEARD = (
    "INSERT INTO heard VALUES (%s, clock_timestamp()) ON CONFLICT (desktop_id) DO UPDATE SET at = excluded.at "
    "RETURNING desktop_id"
)


def open_leases(log: PostgresLog) -> PostgresLeases:
    return PostgresLeases(log)


def _utc(at: datetime.datetime) -> datetime.datetime:
    return at.astimezone(datetime.UTC)


class PostgresLeases:
    def __init__(self, log: PostgresLog):
        self.log = log

    async def prepare(self) -> None:
        # In the log's transaction (its head locked): nodes starting together create them once.
        def create(tx) -> None:
            for statement in SCHEMA:
                tx.execute(statement)

        await self.log.transact(create)

    async def close(self) -> None:
        """Nothing of its own: it speaks through the log's connections."""

    # Writes answer a row (RETURNING) or none: `query` fetches what a statement answers.

    async def grant(self, run_id: str, task_id: str, seconds: float) -> None:
        await self.log.query(
            f"INSERT INTO leases VALUES (%s, %s, {_FROM_NOW}) ON CONFLICT (run_id) "
            "DO UPDATE SET deadline = GREATEST(leases.deadline, excluded.deadline) RETURNING run_id",
            (run_id, task_id, seconds),
        )

    async def renew(self, desktop_id: str, run_ids: Sequence[str], seconds: float) -> None:
        await self.log.query(  # one statement: heard, and renewed
            f"WITH heard AS ({_HEARD}) UPDATE leases SET deadline = GREATEST(deadline, {_FROM_NOW}) "
            "WHERE run_id = ANY(%s) AND deadline >= clock_timestamp() RETURNING run_id",
            (desktop_id, seconds, list(run_ids)),
        )

    async def drop(self, run_id: str) -> None:
        await self.log.query("DELETE FROM leases WHERE run_id = %s RETURNING run_id", (run_id,))

    async def lapsed(self, run_ids: Sequence[str] | None = None) -> list[Lapse]:
        if run_ids is None:
            rows = await self.log.query(
                "SELECT run_id, task_id, deadline FROM leases WHERE deadline < clock_timestamp()"
            )
        elif run_ids:
            rows = await self.log.query(
                "SELECT run_id, task_id, deadline FROM leases WHERE run_id = ANY(%s) AND deadline < clock_timestamp()",
                (list(run_ids),),
            )
        else:
            rows = []
        return [Lapse(run_id, task_id, _utc(deadline)) for run_id, task_id, deadline in rows]

    async def heard(self, desktop_id: str) -> None:
        await self.log.query(_HEARD, (desktop_id,))

    async def last_heard(self, desktop_id: str) -> datetime.datetime | None:
        rows = await self.log.query("SELECT at FROM heard WHERE desktop_id = %s", (desktop_id,))
        return _utc(rows[0][0]) if rows else None

    async def silences(self) -> dict[str, float]:
        rows = await self.log.query(
            "SELECT desktop_id, EXTRACT(EPOCH FROM clock_timestamp() - at)::float8 FROM heard"
        )
        return dict(rows)
