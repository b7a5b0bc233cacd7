"""The desktop's commands (decided over projections/desktops.py's fold)."""

from __future__ import annotations


from events import types as t
from service.commands.deciders import Command


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
