"""/approvals: the second door to a review decision."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from projections import queries
from projections.approvals import Approval
from service import schemas
from service.context import (
    can_see_project, commands_of, idempotency, log_of, meta, principal, settings_of,
)
from service.deciders import Rejected, Review, resolve_approval
from service.http import bad_request, decode_body, json_response, parse_uuid, read_raw_body

PREFIX = "/api/mission-control/approvals"


async def approval_out(request: Request, approval: Approval) -> schemas.ApprovalOut:
    task = await queries.task(log_of(request), approval.task_id)
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
    if status not in ("pending", "approved", "rejected", "all"):
        raise bad_request("Query parameter status must be pending, approved, rejected or all.")
    found = []
    for approval in await queries.approvals(log_of(request), None if status == "all" else status):
        out = await approval_out(request, approval)
        if out.task is not None and await _visible(request, who, approval):
            found.append(out)
    return json_response(found)


async def _visible(request: Request, who, approval: Approval) -> bool:
    task = await queries.task(log_of(request), approval.task_id)
    return task is not None and await can_see_project(request, who, task.project_id)


async def _approval(request: Request, who) -> Approval:
    approval_id = parse_uuid(request.path_params["approval_id"], "Approval id")
    approval = await queries.approval(log_of(request), approval_id)
    if approval is None or not await _visible(request, who, approval):
        raise Rejected(404, "not_found", "Approval not found.")
    return approval


async def get_approval(request: Request) -> Response:
    who = principal(request, "task:read")
    return json_response(await approval_out(request, await _approval(request, who)))


async def resolve(request: Request) -> Response:
    who = principal(request, "approval:write")
    approval = await _approval(request, who)
    raw = await read_raw_body(request)
    settings = settings_of(request)
    body = decode_body(raw, schemas.ReviewBody, settings.max_json_depth, settings.max_string_length)
    idem = idempotency(request, who, raw)
    log = log_of(request)
    command = Review(decision=body.decision, feedback=body.feedback)

    async def through_approval(task):
        resolve_approval(await queries.approval(log, approval.id), task, command)
        return command

    await commands_of(request).task(approval.task_id, through_approval, meta(request, who), idem)
    return json_response(await approval_out(request, await queries.approval(log_of(request), approval.id)))


def routes() -> list[Route]:
    return [
        Route(PREFIX, list_approvals, methods=["GET"]),
        Route(PREFIX + "/{approval_id}", get_approval, methods=["GET"]),
        Route(PREFIX + "/{approval_id}/resolve", resolve, methods=["POST"]),
    ]
