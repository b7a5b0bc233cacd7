"""Stream names: `<kind>-<id>` for one thing's events, built and read back only here.

A task's own events (and its approvals') are in `task-<id>`; its presence in `presence-<id>`, so
watching a task never moves the task's version. Webhook attempts share one stream.
"""

from __future__ import annotations

from typing import NamedTuple

WEBHOOKS = "webhooks"
SETTINGS = "settings"
"""The settings every node of one log must share (settings.recorded)."""


def task(task_id: str) -> str:
    return f"task-{task_id}"


def presence(task_id: str) -> str:
    return f"presence-{task_id}"


def agent(agent_id: str) -> str:
    return f"agent-{agent_id}"


def project(project_id: str) -> str:
    return f"project-{project_id}"


def apikey(key_id: str) -> str:
    return f"apikey-{key_id}"


def desktop(desktop_id: str) -> str:
    return f"desktop-{desktop_id}"


def devices(user_id: str) -> str:
    """A user's devices and the notifications sent to them: seen by that user alone."""
    return f"devices-{user_id}"


class Name(NamedTuple):
    kind: str
    """task, presence, agent, project, apikey, desktop or devices for a stream built here."""
    id: str


def parse(stream: str) -> Name:
    """The kind and id a stream name was built from (`webhooks` and `settings` have no id)."""
    kind, _, ident = stream.partition("-")
    return Name(kind, ident)
