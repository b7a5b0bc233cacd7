"""What the read models are, and how events change them: the domain half of keeping them.

Each Model is one read model: a row per key holding the folded state, plus the columns it is
found by. `fold` turns a run of events into the Changes they make (states and counters); a
backend (projections/sqlite.py) loads the states it asks for and writes the Changes, inside
the log's append transaction (projections/readmodels.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import msgspec

from events import RecordedEvent, UnknownEventType, typed
from events.types import EventData
from projections import (
    agents, apikeys, approvals, desktops, devices, notifications, presence, projects, queue, tasks, usage,
)

logger = logging.getLogger("mission_control.projections")


class Model(NamedTuple):
    """A read model: one row per key, the folded state as JSON plus columns to query by."""

    table: str
    state: type
    key_of: Callable[[EventData], str | None]
    evolve: Callable[[Any, Any], Any]
    columns: dict[str, Callable[[Any], Any]]
    indexes: tuple[str, ...] = ()


TASKS = Model(
    "tasks", tasks.TaskState, tasks.task_id_of, tasks.evolve,
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
DESKTOPS = Model(
    "desktops", desktops.Desktop, desktops.desktop_id_of, desktops.evolve, {"status": lambda s: s.status},
)
QUEUE = Model(
    "queue", queue.QueueEntry, tasks.task_id_of, queue.evolve,
    {"priority": lambda s: s.priority, "queued_position": lambda s: s.queued_position},
    ("priority DESC, queued_position",),
)
DEVICES = Model("devices", devices.UserDevices, devices.user_of, devices.evolve, {})
"""Keyed by user: every route reads the caller's devices at once."""
WATCHES = Model("watches", notifications.Watch, notifications.watch_key_of, notifications.evolve_watch, {})
NOTIFICATIONS = Model(
    "notifications", notifications.Pending, notifications.pending_key_of, notifications.evolve_pending,
    {"cause_position": lambda s: s.cause.position}, ("cause_position",),
)
"""The pending ones: `fan_out` adds them (in `fold`), their sent or final failed event removes them."""
USAGE = Model(
    "usage_shares", usage.UsageShare, lambda data: None, lambda old, event: old,  # kept by `fold`: see `_spent`
    {"agent_id": lambda s: s.agent_id, "project_id": lambda s: s.project_id},
    ("agent_id", "project_id"),
)
"""Each agent's usage over each project's tasks (key `<agentId> <projectId>`)."""
MODELS = (
    TASKS, APPROVALS, PRESENCE, AGENTS, PROJECTS, APIKEYS, DESKTOPS, QUEUE, DEVICES, WATCHES, NOTIFICATIONS, USAGE,
)
DECODERS = {m.table: msgspec.json.Decoder(m.state) for m in MODELS}
"""Each model's stored state (JSON) back into its type, by table: every backend reads with these."""


COUNTER_TABLES = ("counters", "checkpoint")
"""Kept beside the models: named counts (`tasks.running`, `desktops.online`, ...) and the last folded position."""


Loader = Callable[[dict[str, list[str]]], dict[str, dict[str, bytes]]]
"""The stored states (JSON) under some keys of some models' tables, by table and key: those they have."""


class Changes:
    """The states a run of events touches, each loaded once (by `load`), and how far each counter moves."""

    def __init__(self, load: Loader):
        self._load = load
        self.states: dict[str, dict[str, Any]] = {m.table: {} for m in MODELS}
        self.counts: dict[str, int] = {}
        self.position = 0
        """The last event folded."""

    def prefetch(self, keys: dict[str, set[str]]) -> None:
        """Loads the states under `keys` (by table), of every model, in one read (one round trip to
        a database server), rather than one read per model or per key as events ask for them."""
        wanted = {table: missing for table, some in keys.items()
                  if (missing := [key for key in some if key not in self.states[table]])}
        if wanted:
            stored = self._load(wanted)
            for table, missing in wanted.items():
                cached, found = self.states[table], stored.get(table, {})
                for key in missing:
                    state = found.get(key)
                    cached[key] = None if state is None else DECODERS[table].decode(state)

    def get(self, model: Model, key: str) -> Any:
        if key not in self.states[model.table]:
            self.prefetch({model.table: {key}})
        return self.states[model.table][key]

    def put(self, model: Model, key: str, old: Any, new: Any) -> None:
        self.states[model.table][key] = new
        old_status, new_status = getattr(old, "status", None), getattr(new, "status", None)
        if old_status != new_status:
            if old_status is not None:
                self.count(f"{model.table}.{old_status}", -1)
            if new_status is not None:
                self.count(f"{model.table}.{new_status}", 1)

    def count(self, name: str, delta: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + delta

    def rows(self, model: Model) -> Iterator[tuple]:
        """(key, each column's value, the state as JSON) for every state to keep."""
        for key, state in self.states[model.table].items():
            if state is not None:
                yield (key, *(column(state) for column in model.columns.values()), msgspec.json.encode(state))

    def removed(self, model: Model) -> list[str]:
        """Keys whose state the events ended."""
        return [key for key, state in self.states[model.table].items() if state is None]

    def moved(self) -> list[tuple[str, int]]:
        """(counter, delta) for each counter that moved."""
        return [(name, delta) for name, delta in self.counts.items() if delta]


def _spent(changes: Changes, data: EventData) -> tuple[str, str, usage.Usage] | None:
    """(agent, project, its share) when the event ends a run: the task's fold counts it on the task,
    and the agent's share of the task's project counts it the same way. The key needs the task (an
    ending names only its run), so this model is kept here rather than by its own `evolve`."""
    task_id = tasks.task_id_of(data)
    task = changes.get(TASKS, task_id) if task_id is not None else None
    if task is None or task.agent_id is None:
        return None
    used = usage.ended(task.status, task.run_id, data)
    return None if used is None else (task.agent_id, task.project_id, used)


def fold(events: list[RecordedEvent], load: Loader) -> Changes:
    """The changes `events` (which start right after the checkpoint) make to the read models."""
    changes = Changes(load)
    touched: list[tuple[Any, list[tuple[Model, str]]]] = []  # each event, and the states it changes
    keys: dict[str, set[str]] = {m.table: set() for m in MODELS}
    for recorded in events:
        if recorded.version == 1:
            changes.count("log.streams", 1)
        try:
            event = typed(recorded)
        except (UnknownEventType, msgspec.ValidationError, LookupError) as exc:
            logger.warning("read models skip the event at position %d: %s", recorded.position, exc)
            continue
        states = [(model, key) for model in MODELS if (key := model.key_of(event.data)) is not None]
        for model, key in states:
            keys[model.table].add(key)
        if (task_id := notifications.cause_task(event.data)) is not None:
            keys[WATCHES.table].add(task_id)  # its watchers, whom `fan_out` tells
        touched.append((event, states))
    changes.prefetch(keys)
    for event, states in touched:
        spent = _spent(changes, event.data)  # judged on the task as it was before the event
        for model, key in states:
            old = changes.get(model, key)
            changes.put(model, key, old, model.evolve(old, event))
        if spent is not None:
            agent_id, project_id, used = spent
            key = usage.share_key(agent_id, project_id)
            old = changes.get(USAGE, key) or usage.UsageShare(agent_id=agent_id, project_id=project_id)
            changes.put(USAGE, key, old, msgspec.structs.replace(old, usage=usage.add(old.usage, used)))
        if (task_id := notifications.cause_task(event.data)) is not None:
            watch = changes.get(WATCHES, task_id)
            for pending in notifications.fan_out(event, watch, lambda user: changes.get(DEVICES, user)):
                changes.put(NOTIFICATIONS, pending.id, None, pending)
    changes.position = events[-1].position
    return changes
