"""Which projects' tasks and events a caller may see: the 404 for a task outside them, and the
filter the log's readers (the activity stream, /events) apply to what they send."""

from __future__ import annotations

from starlette.requests import Request

from events import RecordedEvent, streams
from projections.readmodels import ReadModels
from projections.tasks import Task
from service.commands.deciders import Refused
from service.http.auth import Principal, may_see_project, visible_projects
from service.http.bodies import parse_uuid


async def can_see_project(request: Request, who: Principal, project_id: str) -> bool:
    # A request that changes something acts: auditors see every project but act only in their own.
    return await may_see_project(request.state.models, who, project_id, acting=request.method != "GET")


async def visible_task(request: Request, who: Principal, task_id: str | None = None) -> Task:
    """The task named in the path, or 404 when it does not exist or lies outside the caller's projects."""
    task_id = parse_uuid(task_id or request.path_params["task_id"], "Task id")
    task = await request.state.models.task(task_id)
    if task is None or not await can_see_project(request, who, task.project_id):
        raise Refused("not_found", "Task not found.")
    return task


_task_projects: dict[str, str] = {}
"""Task id -> project id, shared by every stream. A task never changes project and ids are
UUIDs, so entries never go stale; the size is bounded by dropping the oldest half."""
_TASK_PROJECTS_MAX = 50_000


class Tenancy:
    """What a caller who does not see everything may receive: events of the tasks (and their
    presence) in the caller's projects, of those projects, of agents, and of their own devices
    (the notifications they were sent). Never API keys.

    `whole_log`: the auditor's view, where one who sees everything sees every user's devices too;
    a person's activity stream never carries another user's notifications, an admin's included."""

    def __init__(self, models: ReadModels, who: Principal, *, whole_log: bool = False):
        self.models, self.who, self.whole_log = models, who, whole_log
        self.allowed: set[str] | None = None

    async def prepare(self) -> None:
        allowed = await visible_projects(self.models, self.who)
        self.allowed = None if allowed is None else set(allowed)

    @property
    def everything(self) -> bool:
        return self.allowed is None and self.whole_log

    async def admits(self, event: RecordedEvent) -> bool:
        kind, ident = streams.parse(event.stream)
        if kind == "devices":
            return ident == self.who.user or self.everything
        if self.allowed is None:
            return True
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
