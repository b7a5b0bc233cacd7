"""/tasks: the task lifecycle of API.md."""

from __future__ import annotations

import uuid
from typing import get_args

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from events import RecordedEvent, TypeFilter, decode, typed
from events import streams
from events import types as t
from projections import runs
from projections.lifecycle import STATUSES
from projections.readmodels import TaskOrder
from projections.tasks import Task, served
from service.api import API_PREFIX, schemas
from service.api.schemas import sent_fields
from service.api.devices import own_device
from service.api.tenancy import can_see_project, visible_task
from service.commands.deciders import (
    ArchiveTask, CancelTask, CreateTask, Refused, RetryTask, Review, SendMessage, StartRun, UpdateTask,
)
from service.commands.requests import idempotency, meta
from service.http.auth import Principal, default_project_id, ensure_default_project, visible_projects
from service.http.bodies import parse_uuid, query_int, whole_number
from service.http.errors import bad_request, json_response
from service.http.endpoints import (
    IDEMPOTENCY, IF_MATCH, TEXT, UUID, Param, declared_body, endpoint, whole,
)
from service.ids import new_id
from service.work import outbound
from service.work.local import ECHO_AGENT_ID

PREFIX = f"{API_PREFIX}/tasks"
_TASK = ("ETag",)
_WRONG_STATUS = (409,)  # the task is not in the status the operation needs
MESSAGE_DELIVERY_SECONDS = 2.0
"""How long a message to a run on this node's own desktop waits for its agent to have it."""


def task_response(task: Task, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return json_response(served(task), status, {"ETag": f'"{task.version}"', **(headers or {})})


def if_match(request: Request) -> set[int] | None:
    """The versions `If-Match` accepts ("3", "\"3\"", W/"3", a comma list); None for no header
    or `*`, which any existing task matches."""
    raw = request.headers.get("if-match")
    if raw is None or raw.strip() == "*":
        return None
    versions = {whole_number(tag.strip().removeprefix("W/").strip('"')) for tag in raw.split(",")}
    if None in versions:  # malformed, so bad input (400); 412 is for a version that moved
        raise bad_request(f"If-Match {raw[:40]!r} names no task version: give 3, \"3\", W/\"3\", a comma list, or *.")
    return versions  # type: ignore[return-value]


@endpoint(
    summary="List tasks, newest first (or in queue order).", scope="task:read", answer=list[Task],
    headers=("X-Total-Count",),
    params=(
        Param("status", {"type": "string", "pattern": rf"^({'|'.join(STATUSES)})(,({'|'.join(STATUSES)}))*$"},
              "One status or a comma list."),
        Param("desktopId", TEXT, "Only tasks for this machine."),
        Param("agentId", UUID, "Only tasks of this agent."),
        Param("projectId", UUID, "Only tasks of this project."),
        Param("search", TEXT, "A substring of the title or content."),
        Param("archived", {"enum": ["true", "false", "all"], "default": "false"}, "Archived tasks too, or only."),
        Param("sort", {"enum": list(get_args(TaskOrder)), "default": "newest"},
              "`newest` first, or `queue`: queued tasks first in the order they will be considered (priority, "
              "highest first; then first queued first), then the others newest first."),
        Param("limit", whole(1, 500, 50), "Page size."),
        Param("offset", whole(0, default=0), "Tasks to skip."),
    ),
)
async def list_tasks(request: Request, who: Principal) -> Response:
    q = request.query_params
    statuses = [s for s in q.get("status", "").split(",") if s]
    unknown = [s for s in statuses if s not in STATUSES]
    if unknown:
        raise bad_request(f"Unknown status {unknown[0]!r}; statuses are {', '.join(STATUSES)}.")
    archived_raw = q.get("archived", "false")
    if archived_raw not in ("true", "false", "all"):
        raise bad_request("Query parameter archived must be true, false or all.")
    sort = q.get("sort", "newest")
    if sort not in get_args(TaskOrder):
        raise bad_request(f"Query parameter sort must be {' or '.join(get_args(TaskOrder))}.")
    projects = await _project_filter(request, who, q.get("projectId"))
    agent_id = q.get("agentId")
    found, total = await request.state.models.tasks(
        statuses=statuses or None,
        desktop_id=q.get("desktopId"),
        agent_id=parse_uuid(agent_id, "agentId") if agent_id else None,
        project_ids=projects,
        search=q.get("search") or None,
        archived=None if archived_raw == "all" else archived_raw == "true",
        limit=query_int(request, "limit", 50, 1, 500),
        offset=query_int(request, "offset", 0, 0),
        sort=sort,  # type: ignore[arg-type]
    )
    return json_response([served(task) for task in found], headers={"X-Total-Count": str(total)})


async def _project_filter(request: Request, who: Principal, project_id: str | None) -> list[str] | None:
    allowed = await visible_projects(request.state.models, who)
    if project_id is None:
        return allowed
    project_id = parse_uuid(project_id, "projectId")
    return [project_id] if allowed is None or project_id in allowed else []


@endpoint(
    summary="Create a task.", scope="task:write", body=schemas.CreateTask, status=201, answer=Task,
    headers=("Location", *_TASK), params=(IDEMPOTENCY,), errors=(404, 409),
)
async def create_task(request: Request, who: Principal) -> Response:
    raw, body = await declared_body(request)
    idem = idempotency(request, who, raw)
    models = request.state.models

    async def may_see(task: Task) -> bool:  # not if created by the user's key for another project
        return await can_see_project(request, who, task.project_id)

    # A replay answers before anything is checked or created (the default project) again.
    earlier = await request.state.commands.replay(idem, may_see) if idem else None
    if earlier is not None:
        return task_response(earlier, 201, {"Location": f"{PREFIX}/{earlier.id}"})
    if body.webhook_url is not None:
        try:
            outbound.check_url(body.webhook_url, outbound.allowed(request.app.state.settings.webhook_allow))
        except outbound.Refused as refused:
            raise bad_request(f"webhookUrl {refused}.") from None
    project_id = await _target_project(request, who, body.project_id)
    if body.agent_id is not None and await models.agent(str(body.agent_id)) is None:
        raise Refused("agent_not_found", f"Agent {body.agent_id} not found.")
    for dependency in body.depends_on:
        dep = await models.task(str(dependency), with_watchers=False)
        if dep is None or not await can_see_project(request, who, dep.project_id):
            raise Refused("not_found", f"Dependency {dependency} not found.")
    task_id = new_id()
    event = t.TaskCreated(
        task_id=task_id, type=body.type, content=body.content, project_id=project_id, created_by=who.user,
        title=body.title, description=body.description, desktop_id=body.desktop_id,
        agent_id=str(body.agent_id) if body.agent_id else None,
        requires_approval=request.app.state.settings.require_approval if body.requires_approval is None
        else body.requires_approval,
        priority=body.priority, timeout_seconds=body.timeout_seconds, metadata=body.metadata,
        depends_on=[str(d) for d in body.depends_on], webhook_url=body.webhook_url,
    )
    task, _ = await request.state.commands.task(task_id, CreateTask(event=event), meta(request, who), idem)
    return task_response(task, 201, {"Location": f"{PREFIX}/{task.id}"})


async def _target_project(request: Request, who: Principal, requested: uuid.UUID | None) -> str:
    log, models = request.state.log, request.state.models
    exists = False
    if requested is None and who.project_id is not None:
        project_id = who.project_id
    elif who.project_id is None and (requested is None or str(requested) == default_project_id(who.user)):
        project_id = await ensure_default_project(log, models, who.user, meta(request, who))
        exists = True  # read, or created, just now
    else:
        project_id = str(requested)
    # Checked for every case: a key issued for a project its user has since left creates nothing.
    if (not exists and not await models.project_exists(project_id)) or not await can_see_project(request, who, project_id):
        raise Refused("not_found", f"Project {project_id} not found.")
    return project_id


@endpoint(
    summary="A task, or as it stood at a log position.", scope="task:read", answer=Task, headers=_TASK,
    params=(Param("asOf", whole(0), "A log position: the task as it stood then."),),
)
async def get_task(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    if request.scope["query_string"] and "asOf" in request.query_params:  # (an empty value never gets here: the middleware refuses it)
        position = query_int(request, "asOf", 0, 0)
        past = await request.state.models.task_as_of(task.id, position)
        if past is None:
            raise Refused("not_found", f"Task {task.id} did not exist yet at position {position}.")
        return task_response(past)
    return task_response(task)


@endpoint(
    summary="Change a pending task (title, metadata and archived: any time).", scope="task:write",
    body=schemas.UpdateTask, answer=Task, headers=_TASK, params=(IF_MATCH, IDEMPOTENCY), errors=(412,), needs="edit",
)
async def update_task(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    raw, body = await declared_body(request)
    return await _task_command(request, who, task, UpdateTask(changes=sent_fields(body)), raw, if_match=if_match(request))


@endpoint(
    summary="Archive a task (a tombstone event; the log keeps everything).", scope="task:write", status=204,
    body=schemas.Body, body_required=False, params=(IF_MATCH,), errors=(409, 412),
)
async def delete_task(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    await declared_body(request)  # none, or `{}`: never ignored garbage
    command = ArchiveTask(archived=True)
    await request.state.commands.task(task.id, command, meta(request, who), if_match=if_match(request), known=task)
    return Response(status_code=204)


async def _task_command(request: Request, who: Principal, task: Task, command, raw: bytes, if_match: set[int] | None = None):
    idem = idempotency(request, who, raw)
    updated, _ = await request.state.commands.task(task.id, command, meta(request, who), idem, if_match, task)
    await request.state.models.place_in_queue([updated])  # a priority moves a queued task
    return task_response(updated)


@endpoint(
    summary="Start a run of a pending task on an agent (default: the task's, else echo), or queue it (202).",
    scope="task:write", body=schemas.RunTask, body_required=False, answer=Task, headers=_TASK, params=(IDEMPOTENCY,),
    errors=(503,), needs="run", same_answer=(202,),
)
async def run_task(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    raw, body = await declared_body(request)
    requested = (body.agent_id or body.agent_id_snake) if body else None
    agent_id = str(requested) if requested else task.agent_id or ECHO_AGENT_ID
    idem = idempotency(request, who, raw)
    models = request.state.models
    settings = request.app.state.settings
    commands = request.state.commands

    async def start(state: Task | None) -> StartRun:
        deps = {d: (dep.status if (dep := await models.task(d, with_watchers=False)) else None) for d in (state.depends_on if state else [])}
        agent = await models.agent(agent_id)
        return StartRun(
            run_id=new_id(), agent=agent, agent_id=agent_id,
            actor=who.user, actor_is_admin=who.has("admin"),
            running=await models.running_count(), limit=settings.max_concurrent, dependencies=deps,
            desktops=await models.placements(), queue=body.queue if body else False,
            queue_timeout_seconds=body.queue_timeout_seconds if body else None,
            spent_usd=(await models.usage(agent_id)).cost_usd,
        )

    async with commands.admission():  # the run reaches its desktop by that desktop's poll
        # Runs already queued come first: a slot free now is theirs before it is this one's.
        await request.state.dispatcher.dispatch(full=False)
        started, _ = await commands.task(task.id, start, meta(request, who), idem, known=task)
    await models.place_in_queue([started])
    deadline = getattr(started, "queue_deadline", None)  # None too for an idempotent replay's answer
    if started.status == "queued" and deadline is not None:
        request.state.dispatcher.due_at(deadline)
    return task_response(started, 202 if started.status == "queued" else 200)


@endpoint(
    summary="Cancel a task and stop its run.", scope="task:write", body=schemas.CancelTask, body_required=False,
    answer=Task, headers=_TASK, params=(IDEMPOTENCY,), needs="cancel",
)
async def cancel_task(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    raw, body = await declared_body(request)
    command = CancelTask(reason=body.reason if body else None)
    cancelled, recorded = await request.state.commands.task(
        task.id, command, meta(request, who), idempotency(request, who, raw), known=task
    )
    ended = decode(recorded[-1]).run_id if recorded else None  # a replay or a no-op ends no run
    desktop = request.state.local
    if ended and desktop is not None and task.run_desktop_id == desktop.name:
        # The run's desktop stops it on its next poll, which the cancel wakes; on this node's own,
        # the answer waits for that, so a cancelled local run's processes are gone when it returns.
        agent = await request.state.models.agent(task.agent_id or "")
        grace = float((agent.config if agent else {}).get("killGraceSeconds", 1.0))
        await desktop.stopped(ended, grace + 1)
    cancelled.queue_position = None  # whatever it was, it has left the queue
    return task_response(cancelled)


@endpoint(
    summary="Put a failed or cancelled task back to pending.", scope="task:write", body=schemas.Body,
    body_required=False, answer=Task, headers=_TASK, params=(IDEMPOTENCY,), needs="retry",
)
async def retry_task(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    raw, _ = await declared_body(request)
    return await _task_command(request, who, task, RetryTask(), raw)


@endpoint(
    summary="Send a message to the running agent.", scope="task:write", body=schemas.SendMessage, status=202,
    answer=schemas.Accepted, params=(IDEMPOTENCY,), needs="message",
)
async def send_message(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    raw, body = await declared_body(request)
    idem = idempotency(request, who, raw)
    command = SendMessage(message=body.message)
    sent, recorded = await request.state.commands.task(task.id, command, meta(request, who), idem, known=task)
    desktop = request.state.local
    if recorded and desktop is not None and sent.run_desktop_id == desktop.name:
        # Every desktop takes its messages by poll, which the append wakes; this node's own is
        # waited for, so the agent has the message before the answer (its turn may be ending).
        await desktop.delivered(sent.run_id or "", sent.messages, MESSAGE_DELIVERY_SECONDS)
    return json_response({"accepted": True, "taskId": task.id}, 202)


@endpoint(
    summary="Approve or reject a task in review.", scope="approval:write", body=schemas.ReviewBody,
    answer=Task, headers=_TASK, params=(IDEMPOTENCY,), needs="review",
)
async def review_task(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    raw, body = await declared_body(request)
    return await _task_command(request, who, task, Review(decision=body.decision, feedback=body.feedback), raw)


@endpoint(
    summary="Mark one of the caller's devices as watching the task for 60 s.", scope="task:write",
    body=schemas.PresenceBody, status=204, errors=_WRONG_STATUS,
)
async def mark_presence(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    raw, body = await declared_body(request)
    await own_device(request, who, body.device_id)  # presence decides who is notified: of a known device only
    await request.state.commands.append(  # with a used Idempotency-Key the log appends nothing again
        streams.presence(task.id), [t.PresenceMarked(task_id=task.id, device_id=body.device_id)], None,
        meta(request, who), idempotency(request, who, raw),
    )
    return Response(status_code=204)


@endpoint(
    summary="A device stops watching the task.", scope="task:write", body=schemas.PresenceBody,
    body_required=False, status=204,
    params=(Param("deviceId", {"type": "string", "minLength": 1, "maxLength": 200},
                  "The device, if not in the body: one of the two is required (if both, they must agree)."),),
    errors=_WRONG_STATUS,
)
async def clear_presence(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    device_id = request.query_params.get("deviceId")
    # A body is checked whenever one is sent: garbage next to ?deviceId= is bad input all the same.
    _, body = await declared_body(request, required=device_id is None)
    if body is not None:
        if device_id is not None and device_id != body.device_id:
            raise bad_request("deviceId differs between the body and the query; give it once.")
        device_id = body.device_id
    if not device_id:
        raise bad_request("deviceId is required, in the body or the query.")
    present = await request.state.models.watchers([task.id])
    if device_id in present.get(task.id, []):
        await request.state.log.append(
            streams.presence(task.id), [t.PresenceCleared(task_id=task.id, device_id=device_id)], meta=meta(request, who)
        )
    return Response(status_code=204)


@endpoint(
    summary="The task's events in order: the auditor's view.", scope="task:read", answer=list[RecordedEvent],
    headers=("X-Next-After",),
    params=(Param("after", whole(0, default=0), "A log position to start after."),
            Param("limit", whole(1, 5000, 500), "Page size.")),
)
async def task_events(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    after = query_int(request, "after", 0, 0)
    limit = query_int(request, "limit", 500, 1, 5000)
    page = await request.state.log.read_all(after, limit, streams=[streams.task(task.id)])
    return json_response(page.events, headers={"X-Next-After": str(page.next)})


@endpoint(
    summary="A run's output as the agent wrote it.", scope="task:read", media="text/plain",
    params=(Param("runId", UUID, "The run (default: the current or last)."),),
)
async def task_output(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    run_id = request.query_params.get("runId") or task.run_id
    if run_id is None:
        return Response("", media_type="text/plain; charset=utf-8")
    run_id = parse_uuid(run_id, "runId")
    log = request.state.log
    if run_id != task.run_id and not any(
        msgspec.json.decode(e.payload, type=t.TaskStarted).run_id == run_id
        for e in await log.read_stream(streams.task(task.id), types=TypeFilter(["task.started"]))
    ):  # a mistyped run would otherwise read as a run that wrote nothing
        raise Refused("not_found", f"Task {task.id} has no run {run_id}.")
    only_output = TypeFilter(["task.output"])

    async def chunks():
        version = 0
        while True:
            page = await log.read_stream(streams.task(task.id), version, types=only_output, limit=500)
            if not page:
                return
            for event in page:
                data = msgspec.json.decode(event.payload, type=t.TaskOutput)
                if data.run_id == run_id:
                    yield data.chunk.encode()
            version = page[-1].version

    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")


_RUN_EVENTS = TypeFilter(runs.OUTPUT_FREE)


@endpoint(
    summary="The task's runs, oldest first: the agent and desktop of each, and how it ended.", scope="task:read",
    answer=list[runs.Run],
)
async def task_runs(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    events = await request.state.log.read_stream(streams.task(task.id), types=_RUN_EVENTS)
    return json_response(runs.runs(typed(e) for e in events))


def routes() -> list[Route]:
    return [
        Route("/tasks", list_tasks, methods=["GET"]),
        Route("/tasks", create_task, methods=["POST"]),
        Route("/tasks/{task_id}", get_task, methods=["GET"]),
        Route("/tasks/{task_id}", update_task, methods=["PATCH"]),
        Route("/tasks/{task_id}", delete_task, methods=["DELETE"]),
        Route("/tasks/{task_id}/run", run_task, methods=["POST"]),
        Route("/tasks/{task_id}/cancel", cancel_task, methods=["POST"]),
        Route("/tasks/{task_id}/retry", retry_task, methods=["POST"]),
        Route("/tasks/{task_id}/messages", send_message, methods=["POST"]),
        Route("/tasks/{task_id}/review", review_task, methods=["POST"]),
        Route("/tasks/{task_id}/presence", mark_presence, methods=["POST"]),
        Route("/tasks/{task_id}/presence", clear_presence, methods=["DELETE"]),
        Route("/tasks/{task_id}/events", task_events, methods=["GET"]),
        Route("/tasks/{task_id}/output", task_output, methods=["GET"]),
        Route("/tasks/{task_id}/runs", task_runs, methods=["GET"]),
    ]
