"""Presence: which devices watch a task. Expiry is judged against the clock when read."""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from events import Event
from events import types as t


class Presence(msgspec.Struct, kw_only=True, rename="camel"):
    task_id: str
    device_id: str
    expires_at: str


def evolve(presence: Presence | None, event: Event) -> Presence | None:
    data = event.data
    if isinstance(data, t.PresenceMarked):
        marked = datetime.fromisoformat(event.recorded_at)
        expires = (marked + timedelta(seconds=data.ttl_seconds)).isoformat(timespec="microseconds")
        return Presence(task_id=data.task_id, device_id=data.device_id, expires_at=expires.replace("+00:00", "Z"))
    if isinstance(data, t.PresenceCleared):
        return None
    return presence


def presence_key_of(data: t.EventData) -> str | None:
    if isinstance(data, (t.PresenceMarked, t.PresenceCleared)):
        return f"{data.task_id}/{data.device_id}"
    return None
