"""A task's artifacts, folded at read time from its stream's `artifact.*` events:
`GET /tasks/{id}/artifacts`, and the files each run takes in."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from events import Event
from events import types as t

TYPES = ["artifact.staged", "artifact.recorded"]
"""The event types `artifacts` reads: a type filter for the task's stream."""


class File(msgspec.Struct, kw_only=True, rename="camel"):
    """An artifact's file as a run sees it: what it is called and which bytes it holds."""

    name: str
    sha256: t.Sha256
    size: t.ArtifactSize
    content_type: str


class Artifact(File, kw_only=True, rename="camel"):
    run_id: str | None
    """None while staged for the next run."""
    direction: t.ArtifactDirection
    created_at: str


def artifacts(events: Iterable[Event]) -> list[Artifact]:
    """Oldest first. A staged file is replaced by a later one of its name until a run consumes it."""
    found: list[Artifact] = []
    for event in events:
        data = event.data
        if isinstance(data, t.ArtifactStaged):
            found = [a for a in found if not (a.run_id is None and a.name == data.name)]
            found.append(Artifact(name=data.name, sha256=data.sha256, size=data.size, content_type=data.content_type,
                                  run_id=None, direction="input", created_at=event.recorded_at))
        elif isinstance(data, t.ArtifactRecorded):
            staged = next((a for a in found if a.run_id is None and a.name == data.name), None)
            if data.direction == "input" and staged is not None:  # consumed by the run that started
                staged.run_id = data.run_id
                continue
            found.append(Artifact(name=data.name, sha256=data.sha256, size=data.size, content_type=data.content_type,
                                  run_id=data.run_id, direction=data.direction, created_at=event.recorded_at))
    return found


def file_of(data: t.ArtifactStaged | t.ArtifactRecorded) -> File:
    return File(name=data.name, sha256=data.sha256, size=data.size, content_type=data.content_type)
