"""The desktop: a machine running a worker, or a node's own desktop. Its fold."""

from __future__ import annotations

from typing import Literal

import msgspec

from events import types as t

DesktopStatus = Literal["online", "offline", "draining"]


class Desktop(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    status: DesktopStatus = "online"
    agents: list[t.AgentKind] = []
    capacity: int = 1
    version: str = ""
    hostname: str = ""
    epoch: int = 0
    session_id: str = ""
    key_id: str | None = None
    node: bool = False
    drained_by: t.DrainedBy | None = None
    registered_at: str = ""
    changed_at: str = ""
    """When its last event was recorded: `lastSeenAt` until its worker is heard from."""
