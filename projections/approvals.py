"""Approvals: one per review, resolved once, by either door."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

from events import Event
from events import types as t

ApprovalStatus = Literal["pending", "approved", "rejected"]
APPROVAL_STATUSES: tuple[ApprovalStatus, ...] = get_args(ApprovalStatus)
RESOLVED_BY: dict[t.Decision, ApprovalStatus] = {"approve": "approved", "reject": "rejected"}
"""The status each review decision leaves an approval in."""


class Approval(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    task_id: str
    run_id: str
    status: ApprovalStatus = "pending"
    created_at: str
    resolved_at: str | None = None
    resolved_by: str | None = None
    feedback: str | None = None
    artifacts: list[str] = []
    """The SHA-256 of the run's output artifacts: what it judges."""
    created_position: int = 0


def evolve(approval: Approval | None, event: Event) -> Approval | None:
    data = event.data
    if isinstance(data, t.ApprovalCreated):
        return Approval(
            id=data.approval_id, task_id=data.task_id, run_id=data.run_id, artifacts=data.artifacts,
            created_at=event.recorded_at, created_position=event.position,
        )
    if isinstance(data, t.ApprovalResolved) and approval is not None:
        return msgspec.structs.replace(
            approval, status=RESOLVED_BY[data.decision],
            resolved_at=event.recorded_at, resolved_by=event.actor, feedback=data.feedback,
        )
    return approval


def approval_id_of(data: t.EventData) -> str | None:
    if isinstance(data, (t.ApprovalCreated, t.ApprovalResolved)):
        return data.approval_id
    return None
