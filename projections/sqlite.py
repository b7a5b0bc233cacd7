"""The read models in SQLite tables beside the log's own (events/sqlite.py), in the same file.

A table a Model, keyed by id: its columns to query by, and the state as JSON. They are written
through the log's writer transaction, and read on the log's autocommit reading connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from events import now_rfc3339
from events.sqlite import SqliteLog
from projections.agents import Agent
from projections.apikeys import ApiKey
from projections.approvals import Approval
from projections.desktops import Desktop
from projections.notifications import Pending
from projections.projects import Project
from projections.readmodels import ReadModels
from projections.store import APIKEYS, COUNTER_TABLES, DECODERS, MODELS, Changes, Model
from projections.lifecycle import ACTIVE
from projections.tasks import Task, TaskState
from projections.usage import UsageShare

T = TypeVar("T")

_RUNNING = tuple(f"tasks.{s}" for s in sorted(ACTIVE))


def _ddl() -> list[str]:
    statements = [
        "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), position INTEGER NOT NULL)",
        "INSERT INTO checkpoint VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    ]
    for m in MODELS:
        columns = "".join(f", {c}" for c in m.columns)
        statements.append(f"CREATE TABLE IF NOT EXISTS {m.table} (id TEXT PRIMARY KEY{columns}, state BLOB NOT NULL)")
        statements += [
            f"CREATE INDEX IF NOT EXISTS {m.table}_{i} ON {m.table} ({cols})" for i, cols in enumerate(m.indexes)
        ]
    return statements


def _upsert(model: Model) -> str:
    names = "".join(f"{c}, " for c in model.columns)
    updates = ", ".join(f"{c} = excluded.{c}" for c in (*model.columns, "state"))
    marks = ",".join("?" * (len(model.columns) + 2))
    return f"INSERT INTO {model.table} (id, {names}state) VALUES ({marks}) ON CONFLICT (id) DO UPDATE SET {updates}"


_UPSERTS = {m.table: _upsert(m) for m in MODELS}


def _conditions(equal: dict[str, Any], within: dict[str, list[str] | None]) -> tuple[str, list[Any]]:
    """A WHERE clause and its values: each column of `equal` equal to its value and each of
    `within` one of its values, leaving out those given None."""
    where, params = ["1"], []
    for column, value in equal.items():
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    for column, values in within.items():
        if values is not None:
            where.append(_one_of(column, values))
            params += values
    return " AND ".join(where), params


_LOAD_CHUNK = 500
"""Keys a read of the fold asks for at once, well within SQLite's limit on bound values."""


def _one_of(column: str, values: list[str]) -> str:
    """`column IN (?, ...)` for `values`; an empty list matches nothing."""
    return f"{column} IN ({','.join('?' * len(values)) or 'NULL'})"


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_QUEUE_ORDER = "queue.priority DESC, queue.queued_position"
_ORDERS = {
    "newest": "WHERE {condition} ORDER BY created_position DESC",
    # Queued tasks first, in queue order, then the others newest first.
    "queue": "LEFT JOIN queue ON queue.id = tasks.id WHERE {condition} "
             f"ORDER BY queue.id IS NULL, {_QUEUE_ORDER}, tasks.created_position DESC",
}
_RUNNING_SQL = f"SELECT COALESCE(SUM(value), 0) FROM counters WHERE {_one_of('name', list(_RUNNING))}"
_ACTIVE = sorted(ACTIVE)
_ACTIVE_SQL = f"SELECT state FROM tasks WHERE {_one_of('status', _ACTIVE)}"


def read_models(log: SqliteLog) -> SqliteReadModels:
    return SqliteReadModels(log)


class SqliteReadModels(ReadModels):
    log: SqliteLog

    # --- keeping them -------------------------------------------------------------------

    async def _transact(self, fn: Callable[[Any], T]) -> T:
        return await self.log.transact(fn)

    def _create(self, tx) -> bool:
        tables = {row[0] for row in tx.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for statement in _ddl():
            tx.execute(statement)
        return any(m.table not in tables for m in MODELS)

    def _drop(self, tx) -> None:
        for name in (*COUNTER_TABLES, *(m.table for m in MODELS)):
            tx.execute(f"DROP TABLE IF EXISTS {name}")

    def _checkpoint(self, tx) -> int:
        return tx.execute("SELECT position FROM checkpoint")[0][0]

    def _load(self, tx, keys: dict[str, list[str]]) -> dict[str, dict[str, bytes]]:
        found: dict[str, dict[str, bytes]] = {}
        for table, some in keys.items():  # in process: a statement per table costs no round trip
            states = found[table] = {}
            for start in range(0, len(some), _LOAD_CHUNK):
                chunk = some[start : start + _LOAD_CHUNK]
                states.update(tx.execute(f"SELECT id, state FROM {table} WHERE {_one_of('id', chunk)}", chunk))
        return found

    def _save(self, tx, changes: Changes) -> None:
        for model in MODELS:
            tx.executemany(_UPSERTS[model.table], changes.rows(model))
            tx.executemany(f"DELETE FROM {model.table} WHERE id = ?", [(key,) for key in changes.removed(model)])
        moved = changes.moved()
        tx.executemany(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            moved,
        )
        tx.executemany("DELETE FROM counters WHERE name = ? AND value = 0", [(name,) for name, _ in moved])
        tx.execute("UPDATE checkpoint SET position = ?", (changes.position,))

    # --- reads ----------------------------------------------------------------------------

    async def _get(self, model: Model, key: str) -> Any:
        rows = await self.log.query(f"SELECT state FROM {model.table} WHERE id = ?", (key,))
        return DECODERS[model.table].decode(rows[0][0]) if rows else None

    async def _task_page(self, statuses, desktop_id, agent_id, project_ids, search, archived, limit, offset, sort):
        where, params = ["1"], []
        if statuses:
            where.append(_one_of("status", statuses))
            params += statuses
        for column, value in (("desktop_id", desktop_id), ("agent_id", agent_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if project_ids is not None:
            where.append(_one_of("project_id", project_ids))
            params += project_ids
        if search:
            where.append("(title LIKE ? ESCAPE '\\' OR content LIKE ? ESCAPE '\\')")
            params += [f"%{_escape_like(search)}%"] * 2
        if archived is not None:
            where.append("archived = ?")
            params.append(int(archived))
        condition = " AND ".join(where)
        total = (await self.log.query(f"SELECT COUNT(*) FROM tasks WHERE {condition}", params))[0][0]
        order = _ORDERS[sort].format(condition=condition)
        rows = await self.log.query(
            f"SELECT tasks.state FROM tasks {order} LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return [DECODERS["tasks"].decode(r[0]) for r in rows], total

    async def queued(self, after=None, limit=None) -> list[TaskState]:
        priority, position = after if after is not None else (2**31, 0)
        rows = await self.log.query(
            "SELECT tasks.state FROM queue JOIN tasks ON tasks.id = queue.id "
            "WHERE queue.priority < ? OR (queue.priority = ? AND queue.queued_position > ?) "
            f"ORDER BY {_QUEUE_ORDER} LIMIT ?", [priority, priority, position, -1 if limit is None else limit],  # -1: none
        )
        return [DECODERS["tasks"].decode(r[0]) for r in rows]

    async def queue_positions(self, task_ids: list[str]) -> dict[str, int]:
        rows = await self.log.query(
            f"SELECT id, rank FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY {_QUEUE_ORDER}) AS rank FROM queue) "
            f"WHERE {_one_of('id', task_ids)}", task_ids,
        )
        return dict(rows)

    async def watchers(self, task_ids: list[str]) -> dict[str, list[str]]:
        if not task_ids:
            return {}
        rows = await self.log.query(
            f"SELECT task_id, state FROM presence WHERE {_one_of('task_id', task_ids)} AND expires_at > ? ORDER BY id",
            [*task_ids, now_rfc3339()],
        )
        found: dict[str, list[str]] = {}
        for task_id, state in rows:
            found.setdefault(task_id, []).append(DECODERS["presence"].decode(state).device_id)
        return found

    async def _task_and_watchers(self, task_id: str) -> tuple[Task | None, list[str]]:
        rows = await self.log.query(
            "SELECT t.state, p.state FROM tasks t LEFT JOIN presence p ON p.task_id = t.id AND p.expires_at > ? "
            "WHERE t.id = ? ORDER BY p.id", (now_rfc3339(), task_id),
        )
        if not rows:
            return None, []
        watchers = [DECODERS["presence"].decode(presence).device_id for _, presence in rows if presence is not None]
        return DECODERS["tasks"].decode(rows[0][0]), watchers

    async def approvals(self, status: str | None, projects: list[str] | None) -> list[tuple[Approval, Task]]:
        where, params = _conditions({"a.status": status}, {"t.project_id": projects})
        rows = await self.log.query(
            f"SELECT a.state, t.state FROM approvals a JOIN tasks t ON t.id = a.task_id WHERE {where} "
            "ORDER BY a.created_position", params,
        )
        return [(DECODERS["approvals"].decode(a), DECODERS["tasks"].decode(t)) for a, t in rows]

    async def agents(self) -> list[Agent]:
        rows = await self.log.query("SELECT state FROM agents ORDER BY created_at, id")
        return [DECODERS["agents"].decode(r[0]) for r in rows]

    async def projects(self) -> list[Project]:
        rows = await self.log.query("SELECT state FROM projects ORDER BY created_at, id")
        return [DECODERS["projects"].decode(r[0]) for r in rows]

    async def api_key_by_hash(self, token_hash: str) -> ApiKey | None:
        rows = await self.log.query(f"SELECT state FROM {APIKEYS.table} WHERE token_hash = ?", (token_hash,))
        return DECODERS["apikeys"].decode(rows[0][0]) if rows else None

    async def api_keys(self) -> list[ApiKey]:
        # The apikeys table has no created_at column; keys are few, so they are sorted here.
        rows = await self.log.query("SELECT state FROM apikeys")
        return sorted((DECODERS["apikeys"].decode(r[0]) for r in rows), key=lambda k: (k.created_at, k.id))

    async def _counter_values(self) -> tuple[dict[str, int], int]:
        values = dict(await self.log.query("SELECT name, value FROM counters"))
        return values, (await self.log.query("SELECT position FROM checkpoint"))[0][0]

    async def usage_shares(self, agent_id, project_ids) -> list[UsageShare]:
        where, params = _conditions({"agent_id": agent_id}, {"project_id": project_ids})
        rows = await self.log.query(f"SELECT state FROM usage_shares WHERE {where}", params)
        return [DECODERS["usage_shares"].decode(r[0]) for r in rows]

    async def running_count(self) -> int:
        rows = await self.log.query(_RUNNING_SQL, _RUNNING)
        return rows[0][0]

    async def desktops(self) -> list[Desktop]:
        rows = await self.log.query("SELECT state FROM desktops ORDER BY id")
        return [DECODERS["desktops"].decode(r[0]) for r in rows]

    async def active_runs(self, desktop_id: str | None = None) -> list[TaskState]:
        # Tasks holding a run slot are at most the concurrency limit: the status index finds them,
        # and the desktop is read from their state rather than from a column older tables lack.
        rows = await self.log.query(_ACTIVE_SQL, _ACTIVE)
        found = [DECODERS["tasks"].decode(r[0]) for r in rows]
        if desktop_id is not None:
            found = [task for task in found if task.run_desktop_id == desktop_id]
        return sorted(found, key=lambda task: task.placed_position)

    async def pending_notifications(self, cause_position: int | None = None) -> list[Pending]:
        where, params = ("WHERE cause_position = ? ", [cause_position]) if cause_position is not None else ("", [])
        rows = await self.log.query(f"SELECT state FROM notifications {where}ORDER BY cause_position, id", params)
        return [DECODERS["notifications"].decode(r[0]) for r in rows]
