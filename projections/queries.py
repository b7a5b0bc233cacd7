"""Reads of the read models: what the API serves. Each answers from the tables alone."""

from __future__ import annotations

from typing import Any

import msgspec

from events import EventLog, now_rfc3339, streams, typed
from projections.agents import Agent
from projections.apikeys import ApiKey
from projections.approvals import Approval
from projections.lifecycle import ACTIVE, STATUSES
from projections.projects import Project
from projections.store import APIKEYS, MODELS
from projections.tasks import Task, evolve

_decoders = {m.table: msgspec.json.Decoder(m.state) for m in MODELS}


async def _one(log: EventLog, table: str, key: str) -> Any:
    rows = await log.query(f"SELECT state FROM {table} WHERE id = ?", (key,))
    return _decoders[table].decode(rows[0][0]) if rows else None


def _one_of(column: str, values: list[str]) -> str:
    """`column IN (?, ...)` for `values`; an empty list matches nothing."""
    return f"{column} IN ({','.join('?' * len(values)) or 'NULL'})"


async def watchers(log: EventLog, task_ids: list[str]) -> dict[str, list[str]]:
    """Devices whose presence has not expired, judged against the clock now."""
    if not task_ids:
        return {}
    rows = await log.query(
        f"SELECT task_id, state FROM presence WHERE {_one_of('task_id', task_ids)} AND expires_at > ? ORDER BY id",
        [*task_ids, now_rfc3339()],
    )
    found: dict[str, list[str]] = {}
    for task_id, state in rows:
        found.setdefault(task_id, []).append(_decoders["presence"].decode(state).device_id)
    return found


async def task(log: EventLog, task_id: str, *, with_watchers: bool = True) -> Task | None:
    """The task; its `watchers` (one more query) only for answers that show them."""
    found: Task | None = await _one(log, "tasks", task_id)
    if found is not None and with_watchers:
        found.watchers = (await watchers(log, [task_id])).get(task_id, [])
    return found


async def task_as_of(log: EventLog, task_id: str, position: int) -> Task | None:
    """The task as it stood at a log position, folded from its own events."""
    state: Task | None = None
    for recorded in await log.read_stream(streams.task(task_id), until_position=position):
        state = evolve(state, typed(recorded))
    return state


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def tasks(
    log: EventLog,
    *,
    statuses: list[str] | None = None,
    desktop_id: str | None = None,
    agent_id: str | None = None,
    project_ids: list[str] | None = None,
    search: str | None = None,
    archived: bool | None = False,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Task], int]:
    """Newest first, and the total that matches. `project_ids` None means every project."""
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
    total = (await log.query(f"SELECT COUNT(*) FROM tasks WHERE {condition}", params))[0][0]
    rows = await log.query(
        f"SELECT state FROM tasks WHERE {condition} ORDER BY created_position DESC LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )
    found = [_decoders["tasks"].decode(r[0]) for r in rows]
    live = await watchers(log, [t.id for t in found])
    for t in found:
        t.watchers = live.get(t.id, [])
    return found, total


async def approval(log: EventLog, approval_id: str) -> Approval | None:
    return await _one(log, "approvals", approval_id)


async def approvals(log: EventLog, status: str | None, projects: list[str] | None) -> list[tuple[Approval, Task]]:
    """Approvals, oldest first, each with its task; only those whose task is in `projects`
    (None: every project). One query, however many there are."""
    where, params = ["1"], []
    if status is not None:
        where.append("a.status = ?")
        params.append(status)
    if projects is not None:
        where.append(_one_of("t.project_id", projects))
        params.extend(projects)
    rows = await log.query(
        "SELECT a.state, t.state FROM approvals a JOIN tasks t ON t.id = a.task_id "
        f"WHERE {' AND '.join(where)} ORDER BY a.created_position", params,
    )
    return [(_decoders["approvals"].decode(a), _decoders["tasks"].decode(t)) for a, t in rows]


async def agent(log: EventLog, agent_id: str) -> Agent | None:
    return await _one(log, "agents", agent_id)


async def agents(log: EventLog) -> list[Agent]:
    rows = await log.query("SELECT state FROM agents ORDER BY created_at, id")
    return [_decoders["agents"].decode(r[0]) for r in rows]


async def project(log: EventLog, project_id: str) -> Project | None:
    return await _one(log, "projects", project_id)


async def projects(log: EventLog) -> list[Project]:
    rows = await log.query("SELECT state FROM projects ORDER BY created_at, id")
    return [_decoders["projects"].decode(r[0]) for r in rows]


async def api_key_by_hash(log: EventLog, token_hash: str) -> ApiKey | None:
    rows = await log.query(f"SELECT state FROM {APIKEYS.table} WHERE token_hash = ?", (token_hash,))
    return _decoders["apikeys"].decode(rows[0][0]) if rows else None


async def api_key(log: EventLog, key_id: str) -> ApiKey | None:
    return await _one(log, "apikeys", key_id)


async def api_keys(log: EventLog) -> list[ApiKey]:
    # The apikeys table has no created_at column; keys are few, so they are sorted here.
    rows = await log.query("SELECT state FROM apikeys")
    return sorted((_decoders["apikeys"].decode(r[0]) for r in rows), key=lambda k: (k.created_at, k.id))


class Counters(msgspec.Struct):
    tasks: dict[str, int]
    active_desktops: int
    active_agents: int
    approvals_pending: int
    streams: int
    checkpoint: int


async def counters(log: EventLog) -> Counters:
    """The overview's figures: a handful of rows, whatever the size of the log."""
    rows = dict(await log.query("SELECT name, value FROM counters WHERE name NOT LIKE 'desktop:%'"))
    desktops = (await log.query("SELECT COUNT(*) FROM counters WHERE name LIKE 'desktop:%' AND value > 0"))[0][0]
    position = (await log.query("SELECT position FROM checkpoint"))[0][0]
    return Counters(
        tasks={s: rows.get(f"tasks.{s}", 0) for s in STATUSES},
        active_desktops=desktops,
        active_agents=rows.get("agents.active", 0),
        approvals_pending=rows.get("approvals.pending", 0),
        streams=rows.get("log.streams", 0),
        checkpoint=position,
    )


async def running_count(log: EventLog) -> int:
    names = sorted(f"tasks.{status}" for status in ACTIVE)
    rows = await log.query(f"SELECT COALESCE(SUM(value), 0) FROM counters WHERE {_one_of('name', names)}", names)
    return rows[0][0]
