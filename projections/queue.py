"""The queue: one entry per queued task, kept while its run waits, in queue order by its columns
(priority, highest first; then the position of its `task.queued`, first queued first)."""

from __future__ import annotations

import msgspec

from events import Event
from events import types as t
from projections.lifecycle import LEADS_TO, QUEUED


class QueueEntry(msgspec.Struct, kw_only=True):
    task_id: str
    priority: int
    queued_position: int


def evolve(entry: QueueEntry | None, event: Event) -> QueueEntry | None:
    data = event.data
    if isinstance(data, t.TaskQueued):
        return QueueEntry(task_id=data.task_id, priority=data.priority, queued_position=event.position)
    if entry is None:
        return None
    if (status := LEADS_TO.get(type(data))) is not None and status != QUEUED:
        return None  # started, failed or cancelled: out of the queue
    if isinstance(data, t.TaskUpdated) and data.priority is not msgspec.UNSET:
        return msgspec.structs.replace(entry, priority=data.priority)  # moved, keeping its place in its priority
    return entry

