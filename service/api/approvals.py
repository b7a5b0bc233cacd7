"""/approvals: the second door to a review decision."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from projections.approvals import APPROVAL_STATUSES, Approval
from projections.lifecycle import either
from projections.tasks import Task
from service.api import schemas
from service.http.auth import Principal, visible_projects
from service.api.tenancy import can_see_project
from service.commands.deciders import Refused, Review, resolve_approval
from service.commands.requests import idempotency, meta
from service.http.bodies import parse_uuid
from service.http.errors import bad_request, json_response
from service.http.endpoints import IDEMPOTENCY, Param, declared_body, endpoint


def approval_out(approval: Approval, task: Task | None) -> schemas.ApprovalOut:
    summary = task and schemas.TaskSummary(
        id=task.id, type=task.type, content=task.content, desktop_id=task.desktop_id, title=task.title
    )
    return schemas.ApprovalOut(
        id=approval.id, task_id=approval.task_id, status=approval.status, created_at=approval.created_at,
        resolved_at=approval.resolved_at, resolved_by=approval.resolved_by, feedback=approval.feedback,
        artifacts=approval.artifacts, task=summary,
    )


@endpoint(
    summary="Approvals, oldest first.", scope="task:read", answer=list[schemas.ApprovalOut],
    params=(Param("status", {"enum": [*APPROVAL_STATUSES, "all"], "default": "pending"}, "Which approvals."),),
)
async def list_approvals(request: Request, who: Principal) -> Response:
    status = request.query_params.get("status", "pending")
    if status not in (*APPROVAL_STATUSES, "all"):
        raise bad_request(f"Query parameter status must be {either((*APPROVAL_STATUSES, 'all'))}.")
    models = request.state.models
    found = await models.approvals(None if status == "all" else status, await visible_projects(models, who))
    return json_response([approval_out(approval, task) for approval, task in found])


async def _approval(request: Request, who) -> tuple[Approval, Task]:
    """The approval in the path and its task; 404 outside the caller's projects."""
    approval_id = parse_uuid(request.path_params["approval_id"], "Approval id")
    approval = await request.state.models.approval(approval_id)
    task = approval and await request.state.models.task(approval.task_id, with_watchers=False)
    if task is None or not await can_see_project(request, who, task.project_id):
        raise Refused("not_found", "Approval not found.")
    return approval, task


@endpoint(
    summary="An approval.", scope="task:read", answer=schemas.ApprovalOut,
)
async def get_approval(request: Request, who: Principal) -> Response:
    return json_response(approval_out(*await _approval(request, who)))


@endpoint(
    summary="Approve or reject: the task moves to done or failed in the same append.",
    scope="approval:write", body=schemas.ReviewBody, answer=schemas.ApprovalOut, params=(IDEMPOTENCY,),
    needs="review",
)
async def resolve(request: Request, who: Principal) -> Response:
    approval, task = await _approval(request, who)
    raw, body = await declared_body(request)
    idem = idempotency(request, who, raw)
    models = request.state.models
    command = Review(decision=body.decision, feedback=body.feedback)

    async def through_approval(task):
        resolve_approval(await models.approval(approval.id), task, command)
        return command

    commands = request.state.commands
    async with commands.admission():  # an ending, as a Review through the task's route is (Commands.task)
        task, _ = await commands.task(approval.task_id, through_approval, meta(request, who), idem, known=task)
    return json_response(approval_out(await models.approval(approval.id), task))


def routes() -> list[Route]:
    return [
        Route("/approvals", list_approvals, methods=["GET"]),
        Route("/approvals/{approval_id}", get_approval, methods=["GET"]),
        Route("/approvals/{approval_id}/resolve", resolve, methods=["POST"]),
    ]
