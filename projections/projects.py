"""Projects: a shared context for tasks, and who may see them."""

from __future__ import annotations

from typing import Any

import msgspec

from events import Event
from events import types as t


class Project(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    name: str
    context: str = ""
    members: list[str] = []
    created_at: str
    version: int = 0


def evolve(project: Project | None, event: Event) -> Project | None:
    data = event.data
    if isinstance(data, t.ProjectCreated):
        return Project(
            id=data.project_id, name=data.name, context=data.context, members=data.members,
            created_at=event.recorded_at, version=event.version,
        )
    if project is None or not isinstance(data, t.ProjectUpdated):
        return project
    changes: dict[str, Any] = {
        f: getattr(data, f) for f in ("name", "context", "members") if getattr(data, f) is not msgspec.UNSET
    }
    return msgspec.structs.replace(project, version=event.version, **changes)


def project_id_of(data: t.EventData) -> str | None:
    return data.project_id if data.event_type.startswith("project.") else None  # type: ignore[attr-defined]
