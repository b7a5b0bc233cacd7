"""API keys: who holds which scopes. Only the hash of a key's secret is ever recorded."""

from __future__ import annotations

import msgspec

from events import Event
from events import types as t


class ApiKey(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    user: str
    scopes: list[str]
    project_id: str | None = None
    desktop_id: str | None = None
    """A `worker` key's desktop: the one it may act as."""
    token_hash: str
    revoked: bool = False
    created_at: str
    revoked_at: str | None = None


def evolve(key: ApiKey | None, event: Event) -> ApiKey | None:
    data = event.data
    if isinstance(data, t.ApiKeyIssued):
        return ApiKey(
            id=data.key_id, user=data.user, scopes=data.scopes, project_id=data.project_id,
            desktop_id=data.desktop_id, token_hash=data.token_hash, created_at=event.recorded_at,
        )
    if isinstance(data, t.ApiKeyRevoked) and key is not None:
        return msgspec.structs.replace(key, revoked=True, revoked_at=event.recorded_at)
    return key


def key_id_of(data: t.EventData) -> str | None:
    return data.key_id if data.event_type.startswith("apikey.") else None  # type: ignore[attr-defined]
