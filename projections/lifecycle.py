"""The task's state machine as two tables: which commands each status admits, and which status
each event leads to.

The decider (service/commands/deciders.py) refuses a command its task's status does not admit; the fold
(projections/tasks.py) sets the status an event leads to; the OpenAPI document says which
statuses an operation needs. None of them restates a status list.
"""

from __future__ import annotations

from typing import Literal, get_args

from events import types as t

Status = Literal["pending", "queued", "running", "awaiting_input", "review", "done", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = get_args(Status)
ACTIVE: frozenset[Status] = frozenset({"running", "awaiting_input"})
"""A run in progress: each of these statuses holds one of the `maxConcurrent` run slots."""
QUEUED: Status = "queued"
"""A run waiting for a slot, a desktop or its dependencies: it holds no slot."""

Command = Literal[
    "edit", "prioritise", "annotate", "archive", "run", "cancel", "retry", "message", "review",
    "dispatch", "output", "ask", "finish", "fail", "renew", "lose",
]
"""What can be asked of an existing task: by a client (edit: change a field other than title,
metadata and archived; prioritise: change its priority, which moves a queued run; annotate: change
those three; the rest as their routes say), by the dispatcher (dispatch: start a queued run, or
fail it when it waited too long or a dependency failed), by the desktop
holding the run's lease (output, ask for input, finish, fail, and renew: the lease check, never
recorded), and by the lease keeper (lose: the run's lease lapsed, its worker restarted or lost its key)."""

ADMITS: dict[Command, frozenset[Status]] = {
    "edit": frozenset({"pending"}),
    "prioritise": frozenset({"pending", "queued"}),
    "annotate": frozenset(STATUSES),
    "archive": frozenset(STATUSES),
    "run": frozenset({"pending"}),
    "cancel": frozenset({"pending", "queued", "running", "awaiting_input"}),
    "retry": frozenset({"failed", "cancelled"}),
    "message": ACTIVE,
    "review": frozenset({"review"}),
    "dispatch": frozenset({"queued"}),
    "output": ACTIVE,
    "ask": ACTIVE,
    "finish": ACTIVE,
    "fail": ACTIVE,
    "renew": ACTIVE,
    "lose": ACTIVE,
}
"""Beside these, no refusal but no change either: cancelling a cancelled task, asking a question the
run already asked (a resend), losing a run that is over or whose lease has moved on."""

LEADS_TO: dict[type[t.EventData], Status] = {
    t.TaskCreated: "pending",
    t.TaskQueued: "queued",
    t.TaskStarted: "running",
    t.TaskInputRequested: "awaiting_input",
    t.TaskMessage: "running",
    t.TaskReview: "review",
    t.TaskCompleted: "done",
    t.TaskFailed: "failed",
    t.TaskCancelled: "cancelled",
    t.TaskRetried: "pending",
}
"""Task events absent here leave the status as it is."""


def admits(status: Status, command: Command) -> bool:
    return status in ADMITS[command]


def admitting(command: Command) -> tuple[Status, ...]:
    """The statuses that admit `command`, in lifecycle order."""
    return tuple(s for s in STATUSES if s in ADMITS[command])


def either(statuses: tuple[str, ...]) -> str:
    """`a, b or c`: statuses as a sentence names them."""
    return statuses[0] if len(statuses) == 1 else f"{', '.join(statuses[:-1])} or {statuses[-1]}"
