"""The read models in PostgreSQL tables beside the log's own (events/postgres.py), in the same database.

A table a Model, keyed by id: its columns to query by, and the state as JSON. They are written
through the log's append transaction (which holds the head's lock), and read on its readers.
Text is compared byte by byte (COLLATE "C"), so everything sorts as on SQLite whatever the
database's locale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from events import now_rfc3339
from events.postgres import PostgresLog
from projections.agents import Agent
from projections.apikeys import ApiKey
from projections.approvals import Approval
from projections.desktops import Desktop
from projections.gathering import GatheredReads
from projections.notifications import Pending
from projections.lifecycle import ACTIVE
from projections.projects import Project
from projections.readmodels import ReadModels
from projections.store import APIKEYS, COUNTER_TABLES, DECODERS, MODELS, Changes, Model
from projections.tasks import Task, TaskState
from projections.usage import UsageShare

T = TypeVar("T")

_RUNNING = [f"tasks.{s}" for s in sorted(ACTIVE)]
_ACTIVE = sorted(ACTIVE)
_INTEGER_COLUMNS = {"archived", "created_position", "priority", "queued_position", "cause_position"}
"""The models' columns that hold numbers; the others hold text."""


_QUEUE_ORDER = "queue.priority DESC, queue.queued_position"
_ORDERS = {
    "newest": "WHERE {condition} ORDER BY created_position DESC",
    # Queued tasks first, in queue order, then the others newest first.
    "queue": "LEFT JOIN queue ON queue.id = tasks.id WHERE {condition} "
             f"ORDER BY queue.id IS NULL, {_QUEUE_ORDER}, tasks.created_position DESC",
}


def _text(value: Any) -> Any:
    """Text as a column or a parameter holds it: PostgreSQL's text cannot hold NUL, which a task's
    title or content may (the state itself is kept as bytes, whole); it becomes U+FFFD, in the
    columns and in what is searched for alike."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _stored_as(keys: list[str]) -> dict[str, str]:
    """Each id as `_text` stored it, to the id asked for."""
    return {_text(key): key for key in keys}


def _column_type(name: str) -> str:
    return "BIGINT" if name in _INTEGER_COLUMNS else 'TEXT COLLATE "C"'


def _ddl() -> list[str]:
    statements = [
        'CREATE TABLE IF NOT EXISTS counters (name TEXT COLLATE "C" PRIMARY KEY, value BIGINT NOT NULL)',
        "CREATE TABLE IF NOT EXISTS checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), position BIGINT NOT NULL)",
        "INSERT INTO checkpoint VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    ]
    for m in MODELS:
        columns = "".join(f", {c} {_column_type(c)}" for c in m.columns)
        statements.append(
            f'CREATE TABLE IF NOT EXISTS {m.table} (id TEXT COLLATE "C" PRIMARY KEY{columns}, state BYTEA NOT NULL)'
        )
        statements += [
            f"CREATE INDEX IF NOT EXISTS {m.table}_{i} ON {m.table} ({cols})" for i, cols in enumerate(m.indexes)
        ]
    return statements


def _upsert(model: Model) -> str:
    names = "".join(f"{c}, " for c in model.columns)
    updates = ", ".join(f"{c} = excluded.{c}" for c in (*model.columns, "state"))
    marks = ", ".join(["%s"] * (len(model.columns) + 2))
    return f"INSERT INTO {model.table} (id, {names}state) VALUES ({marks}) ON CONFLICT (id) DO UPDATE SET {updates}"


_UPSERTS = {m.table: _upsert(m) for m in MODELS}


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def read_models(log: PostgresLog) -> PostgresReadModels:
    return PostgresReadModels(log)


class PostgresReadModels(ReadModels):
    log: PostgresLog

    def __init__(self, log: PostgresLog):
        super().__init__(log)
        # Under load, one query answers the reads of many requests: a GET of a task is the first,
        # and a caller who is no admin reads the task's project too.
        self._tasks_and_watchers = GatheredReads(self._fetch_tasks_and_watchers, slots=log.readers)
        self._by_key = {m.table: GatheredReads(functools.partial(self._fetch_states, m), slots=log.readers)
                        for m in MODELS}

    # --- keeping them -------------------------------------------------------------------

    async def _transact(self, fn: Callable[[Any], T]) -> T:
        return await self.log.transact(fn)

    def _create(self, tx) -> bool:
        tables = {row[0] for row in tx.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        for statement in _ddl():
            tx.execute(statement)
        return any(m.table not in tables for m in MODELS)

    def _drop(self, tx) -> None:
        for name in (*COUNTER_TABLES, *(m.table for m in MODELS)):
            tx.execute(f"DROP TABLE IF EXISTS {name}")

    def _checkpoint(self, tx) -> int:
        return tx.execute("SELECT position FROM checkpoint")[0][0]

    def _load(self, tx, keys: dict[str, list[str]]) -> dict[str, dict[str, bytes]]:
        tables = list(keys)
        stored_as = [_stored_as(keys[table]) for table in tables]
        rows = tx.execute(" UNION ALL ".join(
            f"SELECT {n}, id, state FROM {table} WHERE id = ANY(%s)" for n, table in enumerate(tables)
        ), [list(ids) for ids in stored_as])
        found: dict[str, dict[str, bytes]] = {table: {} for table in tables}
        for n, key, state in rows:
            found[tables[n]][stored_as[n][key]] = bytes(state)
        return found

    def _save(self, tx, changes: Changes) -> None:
        with tx.pipeline():
            for model in MODELS:
                tx.executemany(_UPSERTS[model.table], [tuple(map(_text, row)) for row in changes.rows(model)])
                tx.executemany(
                    f"DELETE FROM {model.table} WHERE id = %s", [(_text(key),) for key in changes.removed(model)]
                )
            moved = changes.moved()
            tx.executemany(
                "INSERT INTO counters VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
                moved,
            )
            tx.executemany("DELETE FROM counters WHERE name = %s AND value = 0", [(name,) for name, _ in moved])
            tx.execute("UPDATE checkpoint SET position = %s", (changes.position,))

    # --- reads ----------------------------------------------------------------------------

    async def _get(self, model: Model, key: str) -> Any:
        state = await self._by_key[model.table].get(key)
        return None if state is None else DECODERS[model.table].decode(state)

    async def _fetch_states(self, model: Model, keys: list[str]) -> dict[str, bytes]:
        stored_as = _stored_as(keys)
        rows = await self.log.query(f"SELECT id, state FROM {model.table} WHERE id = ANY(%s)", (list(stored_as),))
        return {stored_as[key]: state for key, state in rows}

    async def _task_page(self, statuses, desktop_id, agent_id, project_ids, search, archived, limit, offset, sort):
        where, params = ["TRUE"], []
        if statuses:
            where.append("status = ANY(%s)")
            params.append(statuses)
        for column, value in (("desktop_id", desktop_id), ("agent_id", agent_id)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(_text(value))
        if project_ids is not None:
            where.append("project_id = ANY(%s)")
            params.append(project_ids)
        if search:  # ILIKE: case-insensitive, as SQLite's LIKE
            where.append("(title ILIKE %s ESCAPE '\\' OR content ILIKE %s ESCAPE '\\')")
            params += [f"%{_escape_like(_text(search))}%"] * 2
        if archived is not None:
            where.append("archived = %s")
            params.append(int(archived))
        condition = " AND ".join(where)
        total = (await self.log.query(f"SELECT COUNT(*) FROM tasks WHERE {condition}", params))[0][0]
        order = _ORDERS[sort].format(condition=condition)
        rows = await self.log.query(
            f"SELECT tasks.state FROM tasks {order} LIMIT %s OFFSET %s",
            [*params, limit, offset],
        )
        return [DECODERS["tasks"].decode(r[0]) for r in rows], total

    async def queued(self, after=None, limit=None) -> list[TaskState]:
        priority, position = after if after is not None else (2**31, 0)
        rows = await self.log.query(
            "SELECT tasks.state FROM queue JOIN tasks ON tasks.id = queue.id "
            "WHERE queue.priority < %s OR (queue.priority = %s AND queue.queued_position > %s) "
            f"ORDER BY {_QUEUE_ORDER} LIMIT %s", [priority, priority, position, limit],  # NULL: no limit
        )
        return [DECODERS["tasks"].decode(r[0]) for r in rows]

    async def queue_positions(self, task_ids: list[str]) -> dict[str, int]:
        rows = await self.log.query(
            f"SELECT id, rank FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY {_QUEUE_ORDER}) AS rank FROM queue) "
            "AS ranked WHERE id = ANY(%s)", [[_text(i) for i in task_ids]],
        )
        return dict(rows)

    async def watchers(self, task_ids: list[str]) -> dict[str, list[str]]:
        if not task_ids:
            return {}
        rows = await self.log.query(
            "SELECT task_id, state FROM presence WHERE task_id = ANY(%s) AND expires_at > %s ORDER BY id",
            [task_ids, now_rfc3339()],
        )
        found: dict[str, list[str]] = {}
        for task_id, state in rows:
            found.setdefault(task_id, []).append(DECODERS["presence"].decode(state).device_id)
        return found

    async def _task_and_watchers(self, task_id: str) -> tuple[Task | None, list[str]]:
        found = await self._tasks_and_watchers.get(task_id)
        if found is None:
            return None, []
        state, presence = found
        return DECODERS["tasks"].decode(state), [DECODERS["presence"].decode(p).device_id for p in presence]

    async def _fetch_tasks_and_watchers(self, task_ids: list[str]) -> dict[str, tuple[bytes, list[bytes]]]:
        """Tasks with their live presence, in one round trip to the server."""
        stored_as = _stored_as(task_ids)
        rows = await self.log.query(
            "SELECT t.id, t.state, ARRAY(SELECT p.state FROM presence p WHERE p.task_id = t.id AND p.expires_at > %s "
            "ORDER BY p.id) FROM tasks t WHERE t.id = ANY(%s)", (now_rfc3339(), list(stored_as)),
        )
        return {stored_as[key]: (state, presence) for key, state, presence in rows}

    async def approvals(self, status: str | None, projects: list[str] | None) -> list[tuple[Approval, Task]]:
        where, params = ["TRUE"], []
        if status is not None:
            where.append("a.status = %s")
            params.append(status)
        if projects is not None:
            where.append("t.project_id = ANY(%s)")
            params.append(projects)
        rows = await self.log.query(
            "SELECT a.state, t.state FROM approvals a JOIN tasks t ON t.id = a.task_id "
            f"WHERE {' AND '.join(where)} ORDER BY a.created_position", params,
        )
        return [(DECODERS["approvals"].decode(a), DECODERS["tasks"].decode(t)) for a, t in rows]

    async def agents(self) -> list[Agent]:
        rows = await self.log.query("SELECT state FROM agents ORDER BY created_at, id")
        return [DECODERS["agents"].decode(r[0]) for r in rows]

    async def projects(self) -> list[Project]:
        rows = await self.log.query("SELECT state FROM projects ORDER BY created_at, id")
        return [DECODERS["projects"].decode(r[0]) for r in rows]

    async def api_key_by_hash(self, token_hash: str) -> ApiKey | None:
        rows = await self.log.query(f"SELECT state FROM {APIKEYS.table} WHERE token_hash = %s", (token_hash,))
        return DECODERS["apikeys"].decode(rows[0][0]) if rows else None

    async def api_keys(self) -> list[ApiKey]:
        # The apikeys table has no created_at column; keys are few, so they are sorted here.
        rows = await self.log.query("SELECT state FROM apikeys")
        return sorted((DECODERS["apikeys"].decode(r[0]) for r in rows), key=lambda k: (k.created_at, k.id))

    async def _counter_values(self) -> tuple[dict[str, int], int]:
        values = dict(await self.log.query("SELECT name, value FROM counters"))
        return values, (await self.log.query("SELECT position FROM checkpoint"))[0][0]

    async def usage_shares(self, agent_id, project_ids) -> list[UsageShare]:
        where, params = ["TRUE"], []
        if agent_id is not None:
            where.append("agent_id = %s")
            params.append(_text(agent_id))
        if project_ids is not None:
            where.append("project_id = ANY(%s)")
            params.append(project_ids)
        rows = await self.log.query(f"SELECT state FROM usage_shares WHERE {' AND '.join(where)}", params)
        return [DECODERS["usage_shares"].decode(r[0]) for r in rows]

    async def running_count(self) -> int:
        rows = await self.log.query(
            "SELECT COALESCE(SUM(value), 0)::BIGINT FROM counters WHERE name = ANY(%s)", [_RUNNING]
        )
        return rows[0][0]

    async def desktops(self) -> list[Desktop]:
        rows = await self.log.query("SELECT state FROM desktops ORDER BY id")
        return [DECODERS["desktops"].decode(r[0]) for r in rows]

    async def active_runs(self, desktop_id: str | None = None) -> list[TaskState]:
        # Tasks holding a run slot are at most the concurrency limit: the status index finds them.
        rows = await self.log.query("SELECT state FROM tasks WHERE status = ANY(%s)", [_ACTIVE])
        found = [DECODERS["tasks"].decode(r[0]) for r in rows]
        if desktop_id is not None:
            found = [task for task in found if task.run_desktop_id == desktop_id]
        return sorted(found, key=lambda task: task.placed_position)

    async def pending_notifications(self, cause_position: int | None = None) -> list[Pending]:
        where, params = ("WHERE cause_position = %s ", [cause_position]) if cause_position is not None else ("", [])
        rows = await self.log.query(f"SELECT state FROM notifications {where}ORDER BY cause_position, id", params)
        return [DECODERS["notifications"].decode(r[0]) for r in rows]
