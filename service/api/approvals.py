"""/approvals: the second door to a review decision."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from projections.approvals import APPROVAL_STATUSES, Approval
from projections.lifecycle import either
from projections.tasks import Task
from service.api import schemas
from service.http.auth import visible_projects
from service.api.tenancy import (
    can_see_project, commands_of, idempotency, meta, models_of, principal,
)
from service.commands.deciders import Refused, Review, resolve_approval
from service.http.bodies import API_PREFIX, bad_request, json_response, parse_uuid, read_body

PREFIX = f"{API_PREFIX}/approvals"


def approval_out(approval: Approval, task: Task | None) -> schemas.ApprovalOut:
    summary = task and schemas.TaskSummary(
        id=task.id, type=task.type, content=task.content, desktop_id=task.desktop_id, title=task.title
    )
    return schemas.ApprovalOut(
        id=approval.id, task_id=approval.task_id, status=approval.status, created_at=approval.created_at,
        resolved_at=approval.resolved_at, resolved_by=approval.resolved_by, feedback=approval.feedback,
        task=summary,
    )


async def list_approvals(request: Request) -> Response:
    who = principal(request, "task:read")
    status = request.query_params.get("status", "pending")
    if status not in (*APPROVAL_STATUSES, "all"):
        raise bad_request(f"Query parameter status must be {either((*APPROVAL_STATUSES, 'all'))}.")
    models = models_of(request)
    found = await models.approvals(None if status == "all" else status, await visible_projects(models, who))
    return json_response([approval_out(approval, task) for approval, task in found])


async def _approval(request: Request, who) -> tuple[Approval, Task]:
    """The approval in the path and its task; 404 outside the caller's projects."""
    approval_id = parse_uuid(request.path_params["approval_id"], "Approval id")
    approval = await models_of(request).approval(approval_id)
    task = approval and await models_of(request).task(approval.task_id, with_watchers=False)
    if task is None or not await can_see_project(request, who, task.project_id):
        raise Refused("not_found", "Approval not found.")
    return approval, task


async def get_approval(request: Request) -> Response:
    who = principal(request, "task:read")
    return json_response(approval_out(*await _approval(request, who)))


async def resolve(request: Request) -> Response:
    who = principal(request, "approval:write")
    approval, task = await _approval(request, who)
    raw, body = await read_body(request, schemas.ReviewBody)
    idem = idempotency(request, who, raw)
    models = models_of(request)
    command = Review(decision=body.decision, feedback=body.feedback)

    async def through_approval(task):
        resolve_approval(await models.approval(approval.id), task, command)
        return command

    task, _ = await commands_of(request).task(approval.task_id, through_approval, meta(request, who), idem, known=task)
    return json_response(approval_out(await models.approval(approval.id), task))


def routes() -> list[Route]:
    return [
        Route(PREFIX, list_approvals, methods=["GET"]),
        Route(PREFIX + "/{approval_id}", get_approval, methods=["GET"]),
        Route(PREFIX + "/{approval_id}/resolve", resolve, methods=["POST"]),
    ]
