"""GET /activity/stream: the log's tail as Server-Sent Events."""

from __future__ import annotations

import msgspec
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from events import RecordedEvent
from service.auth import Principal, visible_projects
from service.context import log_of, principal, settings_of
from service.http import bad_request, parse_uuid
from service.routes.log import type_filter
from projections import queries

PATH = "/api/mission-control/activity/stream"
RETRY_MS = 2000
_encoder = msgspec.json.Encoder()


def resume_position(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not raw.isdigit():
        raise bad_request("Last-Event-ID and after must be a log position (a whole number).")
    return int(raw)


class Tenancy:
    """Which events a caller who does not see everything may receive."""

    def __init__(self, request: Request, who: Principal):
        self.request, self.who = request, who
        self.allowed: set[str] | None = None
        self.task_projects: dict[str, str | None] = {}

    async def prepare(self) -> None:
        allowed = await visible_projects(log_of(self.request), self.who)
        self.allowed = None if allowed is None else set(allowed)

    async def admits(self, event: RecordedEvent) -> bool:
        if self.allowed is None:
            return True
        kind, _, ident = event.stream.partition("-")
        if kind in ("task", "presence"):
            if ident not in self.task_projects:
                task = await queries.task(log_of(self.request), ident)
                self.task_projects[ident] = task.project_id if task else None
            return self.task_projects[ident] in self.allowed
        if kind == "project":
            if ident not in self.allowed:
                await self.prepare()  # a project the caller just joined
            return ident in self.allowed
        return kind == "agent"


async def activity_stream(request: Request) -> Response:
    who = principal(request, "task:read")
    after = resume_position(request)
    types = type_filter(request)
    streams = None
    if task_id := request.query_params.get("taskId"):
        task_id = parse_uuid(task_id, "taskId")
        streams = [f"task-{task_id}", f"presence-{task_id}"]
    if stream := request.query_params.get("stream"):
        streams = [s for s in (streams or [stream]) if s == stream]
    tenancy = Tenancy(request, who)
    await tenancy.prepare()
    log = log_of(request)
    settings = settings_of(request)

    async def events():
        yield ServerSentEvent(comment="connected", retry=RETRY_MS)
        async for event in log.tail(after, streams=streams, types=types):
            if await tenancy.admits(event):
                yield ServerSentEvent(data=_encoder.encode(event).decode(), id=str(event.position))

    return EventSourceResponse(
        events(), ping=settings.heartbeat_seconds, send_timeout=settings.send_timeout_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def routes() -> list[Route]:
    return [Route(PATH, activity_stream, methods=["GET"])]
