"""The desktop: a machine running a worker, or a node's own desktop. Its fold."""

from __future__ import annotations

from typing import Literal

import msgspec

from events import Event
from events import types as t

DesktopStatus = Literal["online", "offline", "draining"]


class Desktop(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    status: DesktopStatus = "online"
    agents: list[t.AgentKind] = []
    capacity: int = 1
    version: str = ""
    """The worker's version."""
    hostname: str = ""
    epoch: int = 0
    session_id: str = ""
    key_id: str | None = None
    node: bool = False
    drained_by: t.DrainedBy | None = None
    """Who asked it to drain; kept while it is offline, so it comes back draining."""
    registered_at: str = ""
    changed_at: str = ""
    """When its last event was recorded: `lastSeenAt` until its worker is heard from."""
    stream_version: int = 0
    """Its stream's version: what the next append to it expects."""


class Placement(msgspec.Struct, kw_only=True):
    """A desktop as placement sees it (service/commands/deciders.py), under the admission lock."""

    id: str
    status: str
    agents: list[str]
    capacity: int
    busy: int
    """Its runs in progress."""
    epoch: int


def evolve(desktop: Desktop | None, event: Event) -> Desktop | None:
    data = event.data
    if isinstance(data, t.DesktopRegistered):
        # A new session clears the worker's own drain; an admin's holds until an admin resumes.
        kept = desktop.drained_by if desktop is not None and desktop.drained_by == "admin" else None
        return Desktop(
            id=data.desktop_id, status="draining" if kept else "online", agents=data.agents,
            capacity=data.capacity, version=data.version, hostname=data.hostname, epoch=data.epoch,
            session_id=data.session_id, key_id=data.key_id, node=data.node, drained_by=kept,
            registered_at=event.recorded_at, changed_at=event.recorded_at, stream_version=event.version,
        )
    if desktop is None or isinstance(data, t.DesktopRemoved):
        return None
    changes: dict = {"changed_at": event.recorded_at, "stream_version": event.version}
    if isinstance(data, t.DesktopOnline):
        changes |= dict(status="online", drained_by=None, epoch=data.epoch)
    elif isinstance(data, t.DesktopOffline):
        changes["status"] = "offline"
    elif isinstance(data, t.DesktopDraining):
        changes |= dict(status="offline" if desktop.status == "offline" else "draining", drained_by=data.by)
    return msgspec.structs.replace(desktop, **changes)


def desktop_id_of(data: t.EventData) -> str | None:
    return data.desktop_id if data.event_type.startswith("desktop.") else None  # type: ignore[attr-defined]
