"""API keys and who may do what.

A key is `mc_` and 43 random URL-safe characters. Only its SHA-256 is recorded (in
`apikey.issued`); a presented key is hashed and looked up, then compared in constant time.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import uuid

import msgspec

from events import EventLog, Meta, WrongExpectedVersion
from events import types as t
from projections.readmodels import ReadModels
from service.deciders import Rejected

SCOPES = ("task:read", "task:write", "approval:write", "agent:write", "audit:read", "admin")
PROJECT_NAMESPACE = uuid.UUID("6f1c3a52-4f0e-4d0b-9c1e-2d9a7c0b5e11")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@functools.lru_cache(maxsize=4096)  # asked on every task created without a projectId
def default_project_id(user: str) -> str:
    """Every user's own project: the same id wherever it is computed."""
    return str(uuid.uuid5(PROJECT_NAMESPACE, f"user:{user}"))


class Principal(msgspec.Struct, kw_only=True):
    user: str
    key_id: str
    scopes: frozenset[str]
    project_id: str | None = None
    """A key issued for one project acts within that project only."""

    def has(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def require(self, scope: str) -> None:
        if not self.has(scope):
            raise Rejected(403, "forbidden", f"This key lacks the {scope} scope this route needs.")


def unauthorized(detail: str) -> Rejected:
    return Rejected(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})


async def authenticate(models: ReadModels, token: str | None) -> Principal:
    if not token:
        raise unauthorized("An API key is required: send Authorization: Bearer <key>.")
    digest = hash_token(token)
    key = await models.api_key_by_hash(digest)
    if key is None or not hmac.compare_digest(key.token_hash, digest):
        raise unauthorized("The API key is not known.")
    if key.revoked:
        raise unauthorized("The API key has been revoked.")
    return Principal(user=key.user, key_id=key.id, scopes=frozenset(key.scopes), project_id=key.project_id)


async def visible_projects(models: ReadModels, principal: Principal, acting: bool = False) -> list[str] | None:
    """The projects whose tasks this principal sees, or with `acting` may change; None means all.
    `audit:read` reads every project but acts only where its user is a member; `admin` does both."""
    everywhere = principal.has("admin") if acting else principal.has("audit:read")
    if everywhere:
        return None if principal.project_id is None else [principal.project_id]
    member_of = [p.id for p in await models.projects() if principal.user in p.members]
    if principal.project_id is not None:  # the key's project, while its user is still a member
        return [principal.project_id] if principal.project_id in member_of else []
    return member_of


async def issue_key(
    log: EventLog, models: ReadModels, user: str, scopes: list[str], project_id: str | None = None,
    actor: str | None = None,
) -> tuple[str, str]:
    """Issue a key (and the user's default project, the first time); returns (key id, token)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    if not user:
        raise ValueError("a key needs a user")
    meta = Meta(actor=actor or user)
    await ensure_default_project(log, models, user, meta)
    if project_id is not None:
        project = await models.project(project_id)
        if project is None:
            raise ValueError(f"project {project_id} does not exist")
        if user not in project.members:
            await log.append(
                f"project-{project_id}",
                [t.ProjectUpdated(project_id=project_id, members=[*project.members, user])],
                expected=project.version, meta=meta,
            )
    token = "mc_" + secrets.token_urlsafe(32)
    key_id = str(uuid.uuid4())
    await log.append(
        f"apikey-{key_id}",
        [t.ApiKeyIssued(key_id=key_id, user=user, scopes=scopes, project_id=project_id, token_hash=hash_token(token))],
        expected=0, meta=meta,
    )
    return key_id, token


async def ensure_default_project(log: EventLog, models: ReadModels, user: str, meta: Meta) -> str:
    project_id = default_project_id(user)
    if await models.project(project_id) is None:
        try:
            await log.append(
                f"project-{project_id}",
                [t.ProjectCreated(project_id=project_id, name=f"{user} (default)", members=[user])],
                expected=0, meta=meta,
            )
        except WrongExpectedVersion:
            pass  # created meanwhile by another request: the same project
    return project_id


async def revoke_key(log: EventLog, models: ReadModels, key_id: str, actor: str | None = None) -> bool:
    keys = {k.id: k for k in await models.api_keys()}
    key = keys.get(key_id)
    if key is None:
        return False
    if not key.revoked:
        await log.append(f"apikey-{key_id}", [t.ApiKeyRevoked(key_id=key_id)], meta=Meta(actor=actor))
    return True
