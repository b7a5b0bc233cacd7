"""API keys and who may do what.

A key is `mc_` and 43 random URL-safe characters. Only its SHA-256 is recorded (in
`apikey.issued`); a presented key is hashed and looked up, then compared in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import re
import secrets
import time
import uuid

import msgspec

from events import EventLog, Meta, TypeFilter, WrongExpectedVersion
from events import streams
from events import types as t
from projections.projects import Project
from projections.readmodels import ReadModels
from service.http.errors import HttpError
from service.ids import new_id
from service.work.jobs import cancelled
from service.work.wire import DesktopName

SCOPES = ("task:read", "task:write", "approval:write", "agent:write", "audit:read", "worker", "admin")
WORKER = "worker"
DESKTOP_NAME = re.compile(DesktopName.__metadata__[0].pattern)
"""The wire's rule for a desktop's name, for names given outside a JSON body (matched whole:
its `$` alone would let a trailing newline through)."""
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
    desktop_id: str | None = None
    """A worker key's desktop: the only one it may act as (and it may do nothing else)."""

    def has(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def require(self, scope: str) -> None:
        if scope == WORKER and self.desktop_id is None:  # `admin` implies every scope but names no desktop
            raise HttpError(403, "forbidden", "This route is a desktop's worker's: it needs a key issued with "
                                              "--scopes worker --desktop NAME.")
        if not self.has(scope):
            raise HttpError(403, "forbidden", f"This key lacks the {scope} scope this route needs.")


def unauthorized(detail: str) -> HttpError:
    return HttpError(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})


async def authenticate(models: ReadModels, digest: str) -> Principal:
    """Whose is the key with this hash, as the read models hold it now."""
    key = await models.api_key_by_hash(digest)
    if key is None or not hmac.compare_digest(key.token_hash, digest):
        raise unauthorized("The API key is not known.")
    if key.revoked:
        raise unauthorized("The API key has been revoked.")
    return Principal(user=key.user, key_id=key.id, scopes=frozenset(key.scopes), project_id=key.project_id,
                     desktop_id=key.desktop_id)


class Keys:
    """Who a presented key is, remembered between requests: a key's lookup was a read on every
    request. What is remembered is forgotten as soon as the log's tail brings any key's event
    (`apikey.issued`, `apikey.revoked`: from any process on the log, within the tail's delay),
    and is never trusted longer than `max_age` whatever the tail, so a revocation takes effect
    on every node within that bound. Refusals are not remembered: an unknown key is looked up
    each time it is presented."""

    max_age = 0.5
    capacity = 10_000

    def __init__(self, log: EventLog, models: ReadModels) -> None:
        self._log = log
        self._models = models
        self._known: dict[str, tuple[float, Principal]] = {}  # the token's hash -> (when looked up, whose)
        self._watch: asyncio.Task | None = None

    def start(self) -> None:
        self._watch = asyncio.create_task(self._forget_on_change(), name="mc-keys")

    async def close(self) -> None:
        if self._watch is not None:
            await cancelled([self._watch])

    async def principal(self, token: str | None) -> Principal:
        if not token:
            raise unauthorized("An API key is required: send Authorization: Bearer <key>.")
        digest = hash_token(token)
        now = time.monotonic()
        known = self._known.get(digest)
        if known is not None and now - known[0] < self.max_age:
            return known[1]
        principal = await authenticate(self._models, digest)
        if len(self._known) >= self.capacity:
            self._known.clear()
        self._known[digest] = (now, principal)
        return principal

    async def _forget_on_change(self) -> None:
        async with contextlib.aclosing(self._log.tail_pages(self._log.head, types=KEY_EVENTS)) as pages:
            async for _ in pages:
                self._known.clear()


KEY_EVENTS = TypeFilter(["apikey."])


def _everywhere(principal: Principal, acting: bool) -> bool:
    """`audit:read` reads every project but acts only where its user is a member; `admin` does both."""
    return principal.has("admin") if acting else principal.has("audit:read")


def sees_project(principal: Principal, project: Project, acting: bool = False) -> bool:
    """Whether this principal sees the tasks of `project`, or with `acting` may change them: a key
    issued for one project keeps to it (while its user is still a member, unless it reads or acts
    everywhere)."""
    if principal.project_id is not None and project.id != principal.project_id:
        return False
    return _everywhere(principal, acting) or principal.user in project.members


async def visible_projects(models: ReadModels, principal: Principal, acting: bool = False) -> list[str] | None:
    """The projects `sees_project` allows; None means all."""
    if _everywhere(principal, acting):
        return None if principal.project_id is None else [principal.project_id]
    return [p.id for p in await models.projects() if sees_project(principal, p, acting)]


async def may_see_project(models: ReadModels, principal: Principal, project_id: str, acting: bool = False) -> bool:
    """`sees_project` for a project named by id, reading that one project rather than every
    project (a request on one task asks this), and none at all for a key that sees everywhere."""
    if _everywhere(principal, acting):
        return principal.project_id is None or project_id == principal.project_id
    project = await models.project(project_id)
    return project is not None and sees_project(principal, project, acting)


async def find_project(models: ReadModels, id_or_name: str) -> Project:
    """The project with this id, else the one project with this name; ValueError otherwise."""
    project = await models.project(id_or_name)
    if project is not None:
        return project
    named = [p for p in await models.projects() if p.name == id_or_name]
    if not named:
        raise ValueError(f"no project with the id or name {id_or_name!r}")
    if len(named) > 1:
        raise ValueError(f"{len(named)} projects are named {id_or_name!r}; give one's id: "
                         + ", ".join(p.id for p in named))
    return named[0]


def check_worker_key(scopes: list[str], desktop: str | None, project: str | None) -> None:
    """A worker key is `worker` alone, for one desktop; a desktop is named on a worker key only."""
    if WORKER in scopes and set(scopes) != {WORKER}:
        raise ValueError("the worker scope must be the key's only scope")
    if WORKER in scopes and project is not None:
        raise ValueError("a worker key sees no project's tasks: leave out --project")
    if WORKER in scopes and desktop is None:
        raise ValueError("a worker key needs --desktop NAME, the desktop it may act as")
    if desktop is not None and WORKER not in scopes:
        raise ValueError("--desktop is for worker keys only: give --scopes worker")
    if desktop is not None and not is_desktop_name(desktop):
        raise ValueError(f"desktop name {desktop[:80]!r} is not 1 to 63 of a-z, 0-9, '.', '_' and '-' "
                         "starting with a letter or a digit")


def is_desktop_name(name: str) -> bool:
    return DESKTOP_NAME.fullmatch(name) is not None


async def issue_key(
    log: EventLog, models: ReadModels, user: str, scopes: list[str], project: str | None = None,
    actor: str | None = None, desktop: str | None = None, idempotency_key: str | None = None,
) -> tuple[str, str]:
    """Issue a key (and the user's default project, the first time); returns (key id, token).
    `project` (an id or a name) restricts the key to it and makes the user a member; `desktop`
    names a `worker` key's desktop; with an `idempotency_key` another issue took already, it
    raises IdempotencyConflict (the tokens differ) and issues nothing. Everything is checked
    before the first append: a refused key appends nothing."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    if not user:
        raise ValueError("a key needs a user")
    check_worker_key(scopes, desktop, project)
    restricted_to = None if project is None else await find_project(models, project)
    project_id = None if restricted_to is None else restricted_to.id
    meta = Meta(actor=actor or user)
    await ensure_default_project(log, models, user, meta)
    if restricted_to is not None and user not in restricted_to.members:
        await log.append(
            streams.project(project_id),
            [t.ProjectUpdated(project_id=project_id, members=[*restricted_to.members, user])],
            expected=restricted_to.version, meta=meta,
        )
    token = "mc_" + secrets.token_urlsafe(32)
    key_id = new_id()
    await log.append(
        streams.apikey(key_id),
        [t.ApiKeyIssued(key_id=key_id, user=user, scopes=scopes, project_id=project_id, token_hash=hash_token(token),
                        desktop_id=desktop)],
        expected=0, meta=meta, idempotency_key=idempotency_key,
    )
    return key_id, token


async def ensure_default_project(log: EventLog, models: ReadModels, user: str, meta: Meta) -> str:
    project_id = default_project_id(user)
    if not await models.project_exists(project_id):
        try:
            await log.append(
                streams.project(project_id),
                [t.ProjectCreated(project_id=project_id, name=f"{user} (default)", members=[user])],
                expected=0, meta=meta,
            )
        except WrongExpectedVersion:
            pass  # created meanwhile by another request: the same project
    return project_id


async def revoke_key(log: EventLog, models: ReadModels, key_id: str, actor: str | None = None) -> None:
    """Revoke a key; ValueError for an unknown one or one already revoked (nothing is appended)."""
    key = await models.api_key(key_id)
    if key is None:
        raise ValueError(f"no key {key_id}")
    if key.revoked:
        raise ValueError(f"key {key_id} was already revoked; nothing changed")
    await log.append(streams.apikey(key_id), [t.ApiKeyRevoked(key_id=key_id)], meta=Meta(actor=actor))
