"""The desktop's commands and their pure decider, over projections/desktops.py's fold."""

from __future__ import annotations

from events import types as t
from projections.desktops import Desktop
from service.commands.deciders import Command, Refused


class Register(Command):
    """A worker session introduces its desktop (a node's own desktop too, with `node`)."""

    session_id: str
    agents: list[t.AgentKind]
    capacity: int
    version: str = ""
    hostname: str = ""
    key_id: str | None = None
    node: bool = False


class Drain(Command):
    by: t.DrainedBy


class Resume(Command):
    pass


class MarkOffline(Command):
    reason: t.DesktopOfflineReason
    epoch: int | None = None
    """Only while the desktop is still at this epoch (None: whatever it is)."""


class Remove(Command):
    pass


DESKTOP_COMMANDS = (Register, Drain, Resume, MarkOffline, Remove)


def decide_desktop(desktop_id: str, desktop: Desktop | None, command: Command) -> list[t.EventData]:
    """What a command does to desktop `desktop_id`, whose fold is `desktop` (None: unknown or removed)."""
    if isinstance(command, Register):
        return _register(desktop_id, desktop, command)
    if isinstance(command, MarkOffline):
        if desktop is None or desktop.status == "offline" or command.epoch not in (None, desktop.epoch):
            return []  # already offline, or a newer session registered since the caller looked
        return [t.DesktopOffline(desktop_id=desktop_id, epoch=desktop.epoch, reason=command.reason)]
    if desktop is None:
        raise Refused("not_found", f"Desktop {desktop_id} not found.")
    if isinstance(command, Drain):
        if desktop.status == "offline":
            raise Refused("invalid_status", f"Desktop {desktop_id} is offline; only an online desktop can drain.")
        if desktop.drained_by in (command.by, "admin"):  # an admin's drain outranks the worker's own
            return []
        return [t.DesktopDraining(desktop_id=desktop_id, by=command.by)]
    if isinstance(command, Resume):
        if desktop.status == "offline" and desktop.drained_by is not None:
            raise Refused(
                "invalid_status", f"Desktop {desktop_id} is offline; resume it once its worker is back.",
            )
        return [t.DesktopOnline(desktop_id=desktop_id, epoch=desktop.epoch)] if desktop.status == "draining" else []
    if isinstance(command, Remove):
        if desktop.status != "offline":
            raise Refused(
                "invalid_status", f"Desktop {desktop_id} is {desktop.status}; only an offline desktop can be removed.",
            )
        return [t.DesktopRemoved(desktop_id=desktop_id)]
    raise TypeError(f"not a desktop command: {type(command).__name__}")


def _register(desktop_id: str, desktop: Desktop | None, c: Register) -> list[t.EventData]:
    if desktop is not None and desktop.node != c.node:
        raise Refused(
            "invalid_status", f"Desktop {desktop_id} is a node's own desktop; a worker cannot register as it."
            if desktop.node else f"Desktop {desktop_id} is a worker's; a node's own desktop needs another name.",
        )
    if desktop is None or desktop.session_id != c.session_id:
        return [t.DesktopRegistered(
            desktop_id=desktop_id, session_id=c.session_id, epoch=(desktop.epoch if desktop else 0) + 1,
            agents=c.agents, capacity=c.capacity, version=c.version, hostname=c.hostname, key_id=c.key_id,
            node=c.node,
        )]
    if desktop.status != "offline":
        return []  # a resend, or the same worker after a server restart
    back: list[t.EventData] = [t.DesktopOnline(desktop_id=desktop_id, epoch=desktop.epoch)]
    if desktop.drained_by is not None:  # silent for a while, it was still draining
        back.append(t.DesktopDraining(desktop_id=desktop_id, by=desktop.drained_by))
    return back
