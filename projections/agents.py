"""Agents: the registry of what can execute runs."""

from __future__ import annotations

from typing import Any

import msgspec

from events import Event
from events import types as t


class Agent(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    name: str
    kind: t.AgentKind
    config: dict[str, Any] = {}
    status: t.AgentStatus = "active"
    created_at: str
    version: int = 0


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
