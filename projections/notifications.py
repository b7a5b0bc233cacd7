"""Who is told of what: the watchers of each task, and the notifications still to deliver.

A user watches a task they created or marked presence on. When a watched task reaches one of
`t.NOTIFY_ON`, `fan_out` decides, from the log alone, which devices are told: every device of
each watcher whose `events` name it, unless one of that watcher's devices has live presence on
the task at the event's own recorded time (then none of theirs is). The decision is a fold of the
log up to that event, so a restart or a rebuild reaches the same one, and the deliveries it
makes are pending until a `notification.sent` or a final `notification.failed` concludes them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import msgspec

from events import Event, parse_rfc3339, rfc3339
from events import types as t
from projections.devices import UserDevices

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "mission-control:notification")


class Watch(msgspec.Struct, kw_only=True, rename="camel"):
    task_id: str
    users: dict[str, dict[str, str]] = {}
    """Each watcher, with the devices it marked presence from and when that presence expires."""


class Pending(msgspec.Struct, kw_only=True, rename="camel"):
    """A notification decided and not yet concluded."""

    id: str
    """The delivery id: the same at every attempt, across restarts and rebuilds."""
    user_id: str
    device_id: str
    task_id: str
    cause: t.Cause
    attempts: int = 0
    last_attempt_at: str | None = None


def delivery_id(position: int, user_id: str, device_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{position}\0{user_id}\0{device_id}"))


def evolve_watch(watch: Watch | None, event: Event) -> Watch | None:
    data = event.data
    if isinstance(data, t.TaskCreated):
        return Watch(task_id=data.task_id, users={data.created_by: {}})
    if isinstance(data, (t.PresenceMarked, t.PresenceCleared)) and event.actor is not None:
        users = {user: dict(marks) for user, marks in (watch.users if watch else {}).items()}
        marks = users.setdefault(event.actor, {})
        if isinstance(data, t.PresenceMarked):
            marks[data.device_id] = rfc3339(parse_rfc3339(event.recorded_at) + timedelta(seconds=data.ttl_seconds))
        else:  # no longer present, still a watcher
            marks.pop(data.device_id, None)
        return Watch(task_id=data.task_id, users=users)
    return watch


def watch_key_of(data: t.EventData) -> str | None:
    if isinstance(data, (t.TaskCreated, t.PresenceMarked, t.PresenceCleared)):
        return data.task_id
    return None


def cause_task(data: t.EventData) -> str | None:
    """The task of an event that notifies its watchers."""
    return data.task_id if data.event_type in t.NOTIFY_ON else None  # type: ignore[attr-defined]


def fan_out(event: Event, watch: Watch | None, devices_of: Callable[[str], UserDevices | None]) -> list[Pending]:
    """The notifications `event` makes, in a stable order (by user, then by registration)."""
    if watch is None:
        return []
    at = parse_rfc3339(event.recorded_at)
    cause = t.Cause(type=event.data.event_type, position=event.position)  # type: ignore[arg-type]
    found = []
    for user in sorted(watch.users):
        if any(parse_rfc3339(expires) > at for expires in watch.users[user].values()):
            continue  # watching it live: none of this user's devices is told
        mine = devices_of(user)
        for device in mine.devices.values() if mine is not None else ():
            if cause.type in device.events:
                found.append(Pending(
                    id=delivery_id(event.position, user, device.device_id), user_id=user,
                    device_id=device.device_id, task_id=watch.task_id, cause=cause,
                ))
    return found


def evolve_pending(pending: Pending | None, event: Event) -> Pending | None:
    data = event.data
    if pending is None or isinstance(data, t.NotificationSent):
        return None
    if isinstance(data, t.NotificationFailed):
        if data.final:
            return None
        return msgspec.structs.replace(pending, attempts=data.attempt, last_attempt_at=event.recorded_at)
    return pending


def pending_key_of(data: t.EventData) -> str | None:
    if isinstance(data, (t.NotificationSent, t.NotificationFailed)):
        return data.delivery_id
    return None
