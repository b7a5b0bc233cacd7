"""The task: its state machine's fold. `decide` (service/commands/deciders.py) reads the same state, and
both read the state machine's tables in projections/lifecycle.py.

The fold's state is a `TaskState`: the task as API.md serves it (`Task`) and, for its current run,
what that run's reports are checked against. Those are the server's own: `served` leaves them out."""

from __future__ import annotations

import datetime
from typing import Any

import msgspec

from events import Event, parse_rfc3339, rfc3339
from events import types as t
from projections import usage as spending
from projections.artifacts import File, file_of
from projections.usage import Usage
from projections.lifecycle import LEADS_TO, Status


class Task(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    type: t.TaskType
    content: str
    title: str | None = None
    description: str | None = None
    status: Status = "pending"
    project_id: str
    desktop_id: str | None = None
    agent_id: str | None = None
    requires_approval: bool = False
    priority: int = 5
    timeout_seconds: int | None = None
    metadata: dict[str, Any] = {}
    depends_on: list[str] = []
    webhook_url: str | None = None
    created_by: str
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    archived: bool = False
    version: int = 0
    runs: int = 0
    result: str | None = None
    error: str | None = None
    watchers: list[str] = []
    """Devices with live presence: judged at read time, never stored by `evolve`."""
    queue_position: int | None = None
    """While queued, its rank in queue order (1 first): judged at read time, never stored by `evolve`."""
    run_id: str | None = None
    """The current or last run."""
    approval_id: str | None = None
    """The approval of the current review, if any."""
    input_prompt: str | None = None
    """What the agent asked for while `awaiting_input`."""
    created_position: int = 0
    usage: Usage = msgspec.field(default_factory=Usage)
    """Summed over its runs (projections/usage.py)."""


class TaskState(Task, kw_only=True, rename="camel"):
    """The fold's state: the served task, and its current run's lease and report counts (reset by
    each `task.started`), kept in the log's fold so a resend still dedupes after a restart."""

    run_desktop_id: str | None = None
    """The desktop the current run is placed on (None: a run recorded before desktops existed)."""
    lease_epoch: int = 0
    """The desktop's epoch the run was placed under: its lease's fence."""
    placed_position: int = 0
    """The log position of the current run's `task.started`: the order runs were placed in."""
    queued_position: int = 0
    """The log position of the current run's `task.queued` (0: not queued): first queued, first started
    within a priority."""
    queued_at: str | None = None
    """When the current run was queued (None: it was started at once)."""
    queue_deadline: str | None = None
    """While queued with a `queueTimeoutSeconds`: when it fails `queue_timeout` unless started."""
    output_seq: int = 0
    """The last output seq recorded for the current run."""
    asks: int = 0
    """Questions the current run has asked."""
    messages: int = 0
    """Messages sent to the current run."""
    staged: list[File] = []
    """Files staged for the next run, which consumes them as it starts."""
    review_artifacts: list[str] = []
    """The SHA-256 of the outputs the current review's approval judges."""


def served(task: Task) -> Task:
    """The task as API.md serves it, without the fold's internal fields."""
    return task if type(task) is Task else msgspec.convert(task, Task, from_attributes=True)


def evolve(task: TaskState | None, event: Event) -> TaskState | None:
    data = event.data
    if isinstance(data, t.TaskCreated):
        return TaskState(
            id=data.task_id, status=LEADS_TO[t.TaskCreated], type=data.type, content=data.content, title=data.title,
            description=data.description, project_id=data.project_id, desktop_id=data.desktop_id,
            agent_id=data.agent_id, requires_approval=data.requires_approval, priority=data.priority,
            timeout_seconds=data.timeout_seconds, metadata=data.metadata, depends_on=data.depends_on,
            webhook_url=data.webhook_url, created_by=data.created_by, created_at=event.recorded_at,
            version=event.version, created_position=event.position,
        )
    if task is None:
        return None
    changes: dict[str, Any] = {"version": event.version}
    if (status := LEADS_TO.get(type(data))) is not None:
        changes["status"] = status
    if (spent := spending.ended(task.status, task.run_id, data)) is not None:
        changes["usage"] = spending.add(task.usage, spent)
    if isinstance(data, t.TaskUpdated):
        changes |= {
            f: getattr(data, f) for f in data.__struct_fields__
            if f != "task_id" and getattr(data, f) is not msgspec.UNSET
        }
    elif isinstance(data, t.TaskArchived):
        changes["archived"] = data.archived
    elif isinstance(data, t.TaskQueued):  # the run exists from here: it is counted, and started later
        deadline = None if data.queue_timeout_seconds is None else rfc3339(
            parse_rfc3339(event.recorded_at) + datetime.timedelta(seconds=data.queue_timeout_seconds))
        changes |= dict(
            run_id=data.run_id, agent_id=data.agent_id, started_at=None, completed_at=None, runs=task.runs + 1,
            result=None, error=None, approval_id=None, priority=data.priority, queued_position=event.position,
            queued_at=event.recorded_at, queue_deadline=deadline,
        )
    elif isinstance(data, t.TaskStarted):
        was_queued = task.status == "queued" and task.run_id == data.run_id
        changes |= dict(
            run_id=data.run_id, agent_id=data.agent_id, started_at=event.recorded_at,
            completed_at=None, runs=task.runs + (0 if was_queued else 1), result=None, error=None, approval_id=None,
            run_desktop_id=data.desktop_id, lease_epoch=data.lease_epoch, placed_position=event.position,
            output_seq=0, asks=0, messages=0, queue_deadline=None, staged=[], review_artifacts=[],
        )
        if not was_queued:
            changes |= dict(queued_position=0, queued_at=None)
    elif isinstance(data, t.TaskOutput):
        if data.run_id == task.run_id:
            changes["output_seq"] = data.seq
    elif isinstance(data, t.TaskInputRequested):
        changes |= dict(input_prompt=data.prompt, asks=task.asks + 1)
    elif isinstance(data, t.TaskMessage):
        changes |= dict(input_prompt=None, messages=task.messages + 1)
    elif isinstance(data, t.TaskReview):
        changes |= dict(result=data.result, input_prompt=None)
    elif isinstance(data, t.ApprovalCreated):
        changes |= dict(approval_id=data.approval_id, review_artifacts=data.artifacts)
    elif isinstance(data, t.ArtifactStaged):
        changes["staged"] = [f for f in task.staged if f.name != data.name] + [file_of(data)]
    elif isinstance(data, t.TaskCompleted):
        changes |= dict(completed_at=event.recorded_at, input_prompt=None)
        if data.result is not None:
            changes["result"] = data.result
    elif isinstance(data, t.TaskFailed):
        changes |= dict(completed_at=event.recorded_at, error=data.error, input_prompt=None, queue_deadline=None)
        if data.result is not None:
            changes["result"] = data.result
    elif isinstance(data, t.TaskCancelled):
        changes |= dict(
            completed_at=event.recorded_at, input_prompt=None, queue_deadline=None,
            error=f"cancelled: {data.reason}" if data.reason else "cancelled",
        )
    elif isinstance(data, t.TaskRetried):
        changes["completed_at"] = None
    return msgspec.structs.replace(task, **changes)


def task_id_of(data: t.EventData) -> str | None:
    """The task whose state an event moves: every task.*, approval.* and artifact.* event."""
    if isinstance(data, (t.ApprovalCreated, t.ApprovalResolved, t.ArtifactStaged, t.ArtifactRecorded)) or (
            data.event_type.startswith("task.")):
        return data.task_id  # type: ignore[attr-defined]
    return None
