"""A task's runs, folded at read time from its stream's events other than `task.output` (which
the reader leaves out with a type filter): `GET /tasks/{id}/runs`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import msgspec

from events import Event
from events import types as t
from projections.lifecycle import LEADS_TO

RunStatus = Literal["queued", "running", "awaiting_input", "review", "done", "failed", "cancelled"]

OUTPUT_FREE = [
    name for name in t.EVENT_TYPES if name.startswith("task.") and name != "task.output"
] + ["artifact.recorded"]
"""The event types `runs` reads: a type filter for the task's stream."""


class Run(msgspec.Struct, kw_only=True, rename="camel"):
    run_id: str
    number: int
    """1 for the task's first run."""
    agent_id: str
    desktop_id: str | None
    status: RunStatus
    queued_at: str | None = None
    """When it was queued (None: started at once)."""
    started_at: str | None = None
    """None while it waits in the queue, and for ever if it leaves the queue without starting."""
    ended_at: str | None = None
    """When the agent stopped: its finish (a review included), failure or cancel."""
    exit_code: int | None = None
    reason: t.FailureKind | None = None
    error: str | None = None
    usage: t.RunUsage | None = None
    """What it spent, as its ending recorded it (None: its agent reported nothing; `costUsd` None:
    its agent names no prices)."""
    artifacts: list[str] = []
    """The SHA-256 of its input and output artifacts, in the order they were recorded."""


def runs(events: Iterable[Event]) -> list[Run]:
    """Oldest first. Events of a run that is not the latest (a late report) change only their own run."""
    found: list[Run] = []
    by_id: dict[str, Run] = {}
    for event in events:
        data = event.data
        if isinstance(data, t.TaskQueued):
            run = Run(
                run_id=data.run_id, number=len(found) + 1, agent_id=data.agent_id, desktop_id=None,
                status="queued", queued_at=event.recorded_at,
            )
            found.append(run)
            by_id[run.run_id] = run
            continue
        if isinstance(data, t.TaskStarted):
            queued = by_id.get(data.run_id)
            if queued is not None:  # its turn came
                queued.status, queued.desktop_id, queued.started_at = "running", data.desktop_id, event.recorded_at
                continue
            run = Run(
                run_id=data.run_id, number=len(found) + 1, agent_id=data.agent_id, desktop_id=data.desktop_id,
                status="running", started_at=event.recorded_at,
            )
            found.append(run)
            by_id[run.run_id] = run
            continue
        run = by_id.get(getattr(data, "run_id", None) or "")
        if isinstance(data, t.ArtifactRecorded):
            if run is not None:
                run.artifacts.append(data.sha256)
            continue
        status = LEADS_TO.get(type(data))
        if run is None or status is None or status == "pending":
            continue
        run.status = status  # type: ignore[assignment]
        if status not in ("running", "awaiting_input") and run.ended_at is None:
            run.ended_at = event.recorded_at
        if getattr(data, "usage", msgspec.UNSET) is not msgspec.UNSET:
            run.usage = data.usage  # type: ignore[union-attr]
        if isinstance(data, t.TaskFailed):
            run.reason, run.error, run.exit_code = data.reason, data.error, data.exit_code
        elif isinstance(data, t.TaskCancelled):
            run.error = f"cancelled: {data.reason}" if data.reason else "cancelled"
    return found
