"""Agents: the registry of what can execute runs, and what each kind of agent may do."""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from events import Event
from events import types as t
from projections.usage import Usage


class KindPolicy(NamedTuple):
    task_types: frozenset[t.TaskType]
    """The task types an agent of the kind runs."""
    admin_only: bool
    """Only an admin key may register, change, pause or resume one."""
    spawns_processes: bool
    """It runs programs on this machine as the service's own user: only admins, and the users its
    `allowedUsers` config names, may run tasks on it."""


AGENT_KINDS: dict[t.AgentKind, KindPolicy] = {
    "shell": KindPolicy(frozenset({"command"}), admin_only=True, spawns_processes=True),
    "exec": KindPolicy(frozenset({"prompt"}), admin_only=False, spawns_processes=True),
    "openai": KindPolicy(frozenset({"prompt"}), admin_only=False, spawns_processes=False),
    "echo": KindPolicy(frozenset({"prompt", "command"}), admin_only=False, spawns_processes=False),
}
"""Every kind of `t.AgentKind`; the function that runs each is in service/work/agents/kinds.py."""


class Agent(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    name: str
    kind: t.AgentKind
    config: dict[str, Any] = {}
    status: t.AgentStatus = "active"
    created_at: str
    version: int = 0
    usage: Usage = msgspec.field(default_factory=Usage)
    """Summed at read time over the runs the caller may see (its projects' tasks), never stored by `evolve`."""


def evolve(agent: Agent | None, event: Event) -> Agent | None:
    data = event.data
    if isinstance(data, t.AgentRegistered):
        return Agent(
            id=data.agent_id, name=data.name, kind=data.kind, config=data.config,
            created_at=event.recorded_at, version=event.version,
        )
    if agent is None:
        return None
    changes: dict[str, Any] = {"version": event.version}
    if isinstance(data, t.AgentUpdated):
        changes |= {
            f: getattr(data, f) for f in ("name", "config", "status") if getattr(data, f) is not msgspec.UNSET
        }
    elif isinstance(data, t.AgentPaused):
        changes["status"] = "paused"
    elif isinstance(data, t.AgentResumed):
        changes["status"] = "active"
    return msgspec.structs.replace(agent, **changes)


def agent_id_of(data: t.EventData) -> str | None:
    return data.agent_id if data.event_type.startswith("agent.") else None  # type: ignore[attr-defined]
