"""What every handler needs from a request: who is asking, and the meta they append under."""

from __future__ import annotations

import hashlib

import msgspec

from starlette.requests import Request

from events import EventLog, Meta, RecordedEvent, canonical_json, streams
from projections.readmodels import ReadModels
from projections.tasks import Task
from service.http.auth import Principal, visible_projects
from service.commands.handling import Commands, Idempotency
from service.commands.deciders import Refused
from service.http.bodies import bad_request, parse_uuid
from service.work.runner import Runner
from service.settings import Settings


def log_of(request: Request) -> EventLog:
    return request.app.state.log


def models_of(request: Request) -> ReadModels:
    return request.app.state.models


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def commands_of(request: Request) -> Commands:
    return request.app.state.commands


def runner_of(request: Request) -> Runner:
    return request.app.state.runner


def principal(request: Request, scope: str) -> Principal:
    """The caller (authenticated by the middleware), refused 403 without `scope`."""
    found: Principal = request.state.principal
    found.require(scope)
    return found


def meta(request: Request, who: Principal) -> Meta:
    return Meta(actor=who.user, request_id=request.state.request_id)


def _same_json(body: bytes) -> bytes:
    """The body in canonical form, so a client's whitespace or key order is not "another body"."""
    try:
        return canonical_json(msgspec.json.decode(body)) if body else b""
    except (msgspec.DecodeError, RecursionError):
        return body


def idempotency(request: Request, who: Principal, body: bytes) -> Idempotency | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200:
        raise bad_request("Idempotency-Key must be 1 to 200 characters.")
    fingerprint = hashlib.sha256(f"{request.method} {request.url.path}\0".encode() + _same_json(body)).hexdigest()
    return Idempotency(f"{who.user}\0{key}", fingerprint)


async def can_see_project(request: Request, who: Principal, project_id: str) -> bool:
    # A request that changes something acts: auditors see every project but act only in their own.
    allowed = await visible_projects(models_of(request), who, acting=request.method != "GET")
    return allowed is None or project_id in allowed


async def visible_task(request: Request, who: Principal, task_id: str | None = None) -> Task:
    """The task named in the path, or 404 when it does not exist or lies outside the caller's projects."""
    task_id = parse_uuid(task_id or request.path_params["task_id"], "Task id")
    task = await models_of(request).task(task_id)
    if task is None or not await can_see_project(request, who, task.project_id):
        raise Refused("not_found", "Task not found.")
    return task


_task_projects: dict[str, str] = {}
"""Task id -> project id, shared by every stream. A task never changes project and ids are
UUIDs, so entries never go stale; the size is bounded by dropping the oldest half."""
_TASK_PROJECTS_MAX = 50_000


class Tenancy:
    """What a caller who does not see everything may receive: events of the tasks (and their
    presence) in the caller's projects, of those projects, and of agents. Never API keys."""

    def __init__(self, models: ReadModels, who: Principal):
        self.models, self.who = models, who
        self.allowed: set[str] | None = None

    async def prepare(self) -> None:
        allowed = await visible_projects(self.models, self.who)
        self.allowed = None if allowed is None else set(allowed)

    @property
    def everything(self) -> bool:
        return self.allowed is None

    async def admits(self, event: RecordedEvent) -> bool:
        if self.allowed is None:
            return True
        kind, ident = streams.parse(event.stream)
        if kind in ("task", "presence"):
            project = _task_projects.get(ident)
            if project is None:
                task = await self.models.task(ident, with_watchers=False)
                if task is None:
                    return False
                project = task.project_id
                if len(_task_projects) >= _TASK_PROJECTS_MAX:
                    for old in list(_task_projects)[: _TASK_PROJECTS_MAX // 2]:
                        del _task_projects[old]
                _task_projects[ident] = project
            return project in self.allowed
        if kind == "project":
            # Membership changes only by project events: a join or a leave takes effect here.
            await self.prepare()
            return ident in self.allowed
        return kind == "agent"
