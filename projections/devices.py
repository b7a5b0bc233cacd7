"""Devices: where a user is told that a task needs them. One state per user, holding all of theirs."""

from __future__ import annotations

import msgspec

from events import Event
from events import types as t


class Device(msgspec.Struct, kw_only=True, rename="camel"):
    device_id: str
    kind: t.DeviceKind
    url: str | None = None
    events: list[t.NotifyOn] = msgspec.field(default_factory=lambda: list(t.NOTIFY_ON))
    created_at: str
    """When it was first registered: a re-registration changes its settings, not its age."""


class UserDevices(msgspec.Struct, kw_only=True, rename="camel"):
    user_id: str
    devices: dict[str, Device] = {}
    """By device id, in the order they were first registered."""


def evolve(state: UserDevices | None, event: Event) -> UserDevices | None:
    data = event.data
    if isinstance(data, t.DeviceRegistered):
        devices = dict(state.devices) if state is not None else {}
        earlier = devices.get(data.device_id)
        devices[data.device_id] = Device(
            device_id=data.device_id, kind=data.kind, url=data.url, events=list(data.events),
            created_at=earlier.created_at if earlier is not None else event.recorded_at,
        )
        return UserDevices(user_id=data.user_id, devices=devices)
    if isinstance(data, t.DeviceRemoved) and state is not None:
        devices = {k: v for k, v in state.devices.items() if k != data.device_id}
        return UserDevices(user_id=data.user_id, devices=devices) if devices else None
    return state


def user_of(data: t.EventData) -> str | None:
    if isinstance(data, (t.DeviceRegistered, t.DeviceRemoved)):
        return data.user_id
    return None
