"""The log as auditors and dashboards read it: /events, /audit/*, /overview."""

from __future__ import annotations

import msgspec
import psutil
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from events import GENESIS_HASH, TypeFilter
from events.types import EVENT_TYPES
from events.verify import verify_chain
from service.api import schemas
from service.api.tenancy import Tenancy, log_of, models_of, principal, settings_of
from service.http.bodies import API_PREFIX, bad_request, json_response, query_int

_encoder = msgspec.json.Encoder()


def type_filter(request: Request) -> TypeFilter | None:
    raw = request.query_params.get("types")
    if raw is None:
        return None
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        raise bad_request("Query parameter types names no event type.")
    unknown = next((n for n in names if not _names_types(n)), None)
    if unknown is not None:  # a misspelt type would otherwise match nothing, silently
        raise bad_request(f"Query parameter types names {unknown[:60]!r}, which is no event type nor the prefix of one.")
    return TypeFilter(names)


def _names_types(name: str) -> bool:
    if not name.endswith((".", "*")):
        return name in EVENT_TYPES
    prefix = name.removesuffix("*")
    return any(known.startswith(prefix) for known in EVENT_TYPES)


async def list_events(request: Request) -> Response:
    who = principal(request, "audit:read")
    log = log_of(request)
    after = query_int(request, "after", 0, 0)
    stream = request.query_params.get("stream")
    streams = [stream] if stream else None
    types = type_filter(request)
    tenancy = Tenancy(models_of(request), who)  # an auditor's key issued for one project reads that project's events
    await tenancy.prepare()
    if "application/x-ndjson" in request.headers.get("accept", ""):
        return StreamingResponse(_ndjson(log, after, streams, types, tenancy), media_type="application/x-ndjson")
    limit = query_int(request, "limit", 500, 1, 5000)
    head = await log.read_head()  # as stored: the CLI's appends count too, not only once the tail has seen them
    page = await log.read_all(after, limit, streams=streams, types=types, until=head)
    events = await _admitted(tenancy, page.events)
    return json_response(schemas.EventsPage(events=events, next=page.next, head=head))


async def _admitted(tenancy: Tenancy, events: list) -> list:
    return events if tenancy.everything else [e for e in events if await tenancy.admits(e)]


async def _ndjson(log, after: int, streams, types, tenancy: Tenancy):
    head = await log.read_head()
    while after < head:
        page = await log.read_all(after, 5000, streams=streams, types=types, until=head)
        if events := await _admitted(tenancy, page.events):
            yield b"".join(_encoder.encode(e) + b"\n" for e in events)
        after = page.next


async def verify(request: Request) -> Response:
    principal(request, "audit:read")
    return json_response(await verify_chain(log_of(request)))


async def digest(request: Request) -> Response:
    principal(request, "audit:read")
    log = log_of(request)
    head = await log.read_head()
    if head == 0:
        return json_response(schemas.Digest(position=0, hash=GENESIS_HASH))
    page = await log.read_all(head - 1, 1, until=head)
    return json_response(schemas.Digest(position=head, hash=page.events[0].hash))


async def overview(request: Request) -> Response:
    principal(request, "task:read")
    log = log_of(request)
    figures = await models_of(request).counters()
    memory = psutil.virtual_memory()
    return json_response(schemas.Overview(
        tasks=figures.tasks,
        active_desktops=figures.active_desktops,
        active_agents=figures.active_agents,
        approvals_pending=figures.approvals_pending,
        max_concurrent=settings_of(request).max_concurrent,
        resources=schemas.Resources(
            cpu=psutil.cpu_percent(interval=None),
            memory=schemas.Memory(
                used=(memory.total - memory.available) // 2**20, total=memory.total // 2**20,
                percent=memory.percent,
            ),
        ),
        log=schemas.LogFigures(head=await log.read_head(), streams=figures.streams),  # the CLI's appends too
    ))


def routes() -> list[Route]:
    return [
        Route(f"{API_PREFIX}/events", list_events, methods=["GET"]),
        Route(f"{API_PREFIX}/audit/verify", verify, methods=["GET"]),
        Route(f"{API_PREFIX}/audit/digest", digest, methods=["GET"]),
        Route(f"{API_PREFIX}/overview", overview, methods=["GET"]),
    ]
