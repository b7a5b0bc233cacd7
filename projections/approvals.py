"""Approvals: one per review, resolved once, by either door."""

from __future__ import annotations

from typing import Literal

import msgspec

from events import Event
from events import types as t


class Approval(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    task_id: str
    run_id: str
    status: Literal["pending", "approved", "rejected"] = "pending"
    created_at: str
    resolved_at: str | None = None
    resolved_by: str | None = None
    feedback: str | None = None
    created_position: int = 0


def evolve(approval: Approval | None, event: Event) -> Approval | None:
    data = event.data
    if isinstance(data, t.ApprovalCreated):
        return Approval(
            id=data.approval_id, task_id=data.task_id, run_id=data.run_id,
            created_at=event.recorded_at, created_position=event.position,
        )
    if isinstance(data, t.ApprovalResolved) and approval is not None:
        return msgspec.structs.replace(
            approval, status="approved" if data.decision == "approve" else "rejected",
            resolved_at=event.recorded_at, resolved_by=event.actor, feedback=data.feedback,
        )
    return approval


def approval_id_of(data: t.EventData) -> str | None:
    if isinstance(data, (t.ApprovalCreated, t.ApprovalResolved)):
        return data.approval_id
    return None
