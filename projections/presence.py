"""Presence: which devices watch a task. Expiry is judged against the clock when read."""

from __future__ import annotations

from datetime import timedelta

import msgspec

from events import Event, parse_rfc3339, rfc3339
from events import types as t


class Presence(msgspec.Struct, kw_only=True, rename="camel"):
    task_id: str
    device_id: str
    expires_at: str


def evolve(presence: Presence | None, event: Event) -> Presence | None:
    data = event.data
    if isinstance(data, t.PresenceMarked):
        expires = rfc3339(parse_rfc3339(event.recorded_at) + timedelta(seconds=data.ttl_seconds))
        return Presence(task_id=data.task_id, device_id=data.device_id, expires_at=expires)
    if isinstance(data, t.PresenceCleared):
        return None
    return presence


def presence_key_of(data: t.EventData) -> str | None:
    if isinstance(data, (t.PresenceMarked, t.PresenceCleared)):
        return f"{data.task_id}/{data.device_id}"
    return None
