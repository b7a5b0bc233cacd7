"""Keeps the read-model tables in step with the log.

`project` is the log's projector: it runs inside every append's transaction, so a
read model can never disagree with the log it came from. It first catches up on any
events it has not seen (appended by a process without a projector, or not yet refolded
by a rebuild), using the checkpoint kept in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from events import EventLog, RecordedEvent, Transaction, UnknownEventType, typed
from events.types import EventData
from projections import agents, apikeys, approvals, presence, projects, tasks

log = logging.getLogger("mission_control.projections")


class Model(NamedTuple):
    """A read model: one row per key, the folded state as JSON plus columns to query by."""

    table: str
    state: type
    key_of: Callable[[EventData], str | None]
    evolve: Callable[[Any, Any], Any]
    columns: dict[str, Callable[[Any], Any]]
    indexes: tuple[str, ...] = ()


TASKS = Model(
    "tasks", tasks.Task, tasks.task_id_of, tasks.evolve,
    {
        "project_id": lambda s: s.project_id, "status": lambda s: s.status,
        "agent_id": lambda s: s.agent_id, "desktop_id": lambda s: s.desktop_id,
        "archived": lambda s: int(s.archived), "created_position": lambda s: s.created_position,
        "title": lambda s: s.title, "content": lambda s: s.content,
    },
    ("archived, created_position", "status, created_position", "project_id, created_position"),
)
APPROVALS = Model(
    "approvals", approvals.Approval, approvals.approval_id_of, approvals.evolve,
    {"task_id": lambda s: s.task_id, "status": lambda s: s.status, "created_position": lambda s: s.created_position},
    ("status, created_position",),
)
PRESENCE = Model(
    "presence", presence.Presence, presence.presence_key_of, presence.evolve,
    {"task_id": lambda s: s.task_id, "expires_at": lambda s: s.expires_at},
    ("task_id",),
)
AGENTS = Model(
    "agents", agents.Agent, agents.agent_id_of, agents.evolve,
    {"status": lambda s: s.status, "created_at": lambda s: s.created_at},
)
PROJECTS = Model(
    "projects", projects.Project, projects.project_id_of, projects.evolve,
    {"created_at": lambda s: s.created_at},
)
APIKEYS = Model(
    "apikeys", apikeys.ApiKey, apikeys.key_id_of, apikeys.evolve,
    {"token_hash": lambda s: s.token_hash, "user_id": lambda s: s.user},
    ("token_hash",),
)
MODELS = (TASKS, APPROVALS, PRESENCE, AGENTS, PROJECTS, APIKEYS)


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


def create_tables(tx: Transaction) -> None:
    for statement in _ddl():
        tx.execute(statement)


def drop_tables(tx: Transaction) -> None:
    for name in ("counters", "checkpoint", *(m.table for m in MODELS)):
        tx.execute(f"DROP TABLE IF EXISTS {name}")


def checkpoint(tx: Transaction) -> int:
    return tx.execute("SELECT position FROM checkpoint")[0][0]


class _Batch:
    """The states one transaction touches, loaded once, written once."""

    def __init__(self, tx: Transaction):
        self.tx = tx
        self.states: dict[str, dict[str, Any]] = {m.table: {} for m in MODELS}
        self.counts: dict[str, int] = {}

    def get(self, model: Model, key: str) -> Any:
        cached = self.states[model.table]
        if key not in cached:
            rows = self.tx.execute(f"SELECT state FROM {model.table} WHERE id = ?", (key,))
            cached[key] = msgspec.json.decode(rows[0][0], type=model.state) if rows else None
        return cached[key]

    def put(self, model: Model, key: str, old: Any, new: Any) -> None:
        self.states[model.table][key] = new
        old_status, new_status = getattr(old, "status", None), getattr(new, "status", None)
        if old_status != new_status:
            if old_status is not None:
                self.count(f"{model.table}.{old_status}", -1)
            if new_status is not None:
                self.count(f"{model.table}.{new_status}", 1)
        if model is TASKS:
            for state, delta in ((old, -1), (new, 1)):
                if state is not None and state.status == "running" and state.desktop_id:
                    self.count(f"desktop:{state.desktop_id}", delta)

    def count(self, name: str, delta: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + delta

    def flush(self, position: int) -> None:
        tx = self.tx
        for model in MODELS:
            states = self.states[model.table]
            names = ", ".join(model.columns)
            updates = ", ".join(f"{c} = excluded.{c}" for c in (*model.columns, "state"))
            marks = ",".join("?" * (len(model.columns) + 2))
            tx.executemany(
                f"INSERT INTO {model.table} (id, {names}, state) VALUES ({marks}) "
                f"ON CONFLICT (id) DO UPDATE SET {updates}",
                [
                    (key, *(column(s) for column in model.columns.values()), msgspec.json.encode(s))
                    for key, s in states.items() if s is not None
                ],
            )
            tx.executemany(
                f"DELETE FROM {model.table} WHERE id = ?", [(key,) for key, s in states.items() if s is None]
            )
        changed = [(name, delta) for name, delta in self.counts.items() if delta]
        tx.executemany(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            changed,
        )
        # A count back at zero leaves no row, so the tables do not depend on how the events
        # were batched: a rebuild folds thousands at once, the live projector a few.
        tx.executemany("DELETE FROM counters WHERE name = ? AND value = 0", [(name,) for name, _ in changed])
        tx.execute("UPDATE checkpoint SET position = ?", (position,))


def apply(tx: Transaction, events: list[RecordedEvent]) -> None:
    """Fold events, which start right after the checkpoint, into the tables."""
    batch = _Batch(tx)
    for recorded in events:
        if recorded.version == 1:
            batch.count("log.streams", 1)
        try:
            event = typed(recorded)
        except (UnknownEventType, msgspec.ValidationError, LookupError) as exc:
            log.warning("read models skip the event at position %d: %s", recorded.position, exc)
            continue
        for model in MODELS:
            key = model.key_of(event.data)
            if key is not None:
                old = batch.get(model, key)
                batch.put(model, key, old, model.evolve(old, event))
    batch.flush(events[-1].position)


def catch_up(tx: Transaction, until: int, page: int = 5000) -> int:
    """Fold at most one page of what lies between the checkpoint and `until`; the new checkpoint."""
    events = tx.read_events(checkpoint(tx), until, page)
    if events:
        apply(tx, events)
        return events[-1].position
    return checkpoint(tx)


def project(tx: Transaction, events: list[RecordedEvent]) -> None:
    """The log's projector."""
    done = checkpoint(tx)
    fresh = [e for e in events if e.position > done]
    if not fresh:
        return
    while done < fresh[0].position - 1:
        done = catch_up(tx, fresh[0].position - 1)
    apply(tx, fresh)


async def prepare(log: EventLog) -> None:
    """Create the tables if missing and fold whatever the log holds that they lack."""
    await log.transact(create_tables)
    await refold(log)


async def refold(log: EventLog, progress: Callable[[int, int], None] | None = None) -> int:
    head = await log.read_head()
    done = await log.transact(checkpoint)
    while done < head:
        done = await log.transact(lambda tx: catch_up(tx, head))
        if progress is not None:
            progress(done, head)
    return done


EVERYTHING = 2**62
"""A position past any head: `until` for reading every event there is."""


async def rebuild(log: EventLog, progress: Callable[[int, int], None] | None = None) -> int:
    """Drop every read model and refold it from the log, all in one transaction: a server
    running beside it never reads half-built tables (its appends wait for the rebuild)."""
    head = await log.read_head()

    def refold_all(tx: Transaction) -> int:
        drop_tables(tx)
        create_tables(tx)
        done = 0
        while events := tx.read_events(done, EVERYTHING, 5000):  # up to the head, and whatever came since
            apply(tx, events)
            done = events[-1].position
            if progress is not None:
                progress(done, max(head, done))
        return done

    return await log.transact(refold_all)
