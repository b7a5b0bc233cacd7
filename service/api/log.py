"""The log as auditors read it: /events, /audit/verify, /audit/digest."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from events import GENESIS_HASH, TypeFilter
from events.types import EVENT_TYPES
from events.verify import ChainReport, verify_chain
from service.api import schemas
from service.api.tenancy import Tenancy
from service.http.auth import Principal
from service.http.bodies import query_int
from service.http.errors import bad_request, json_response
from service.http.endpoints import TEXT, TYPES, Param, endpoint, whole

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


@endpoint(
    summary="A page of the log (or all of it as NDJSON with Accept: application/x-ndjson).",
    scope="audit:read", answer=schemas.EventsPage,
    alternative=("application/x-ndjson", "One recorded event a line, every match up to the head."),
    params=(Param("after", whole(0, default=0), "A log position to start after."),
            Param("limit", whole(1, 5000, 500), "Page size (JSON only)."),
            Param("stream", TEXT, "Only this stream (`task-<id>`)."), TYPES),
)
async def list_events(request: Request, who: Principal) -> Response:
    log = request.state.log
    after = query_int(request, "after", 0, 0)
    stream = request.query_params.get("stream")
    streams = [stream] if stream else None
    types = type_filter(request)
    # An auditor's key issued for one project reads that project's events (and its user's devices').
    tenancy = Tenancy(request.state.models, who, whole_log=True)
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


@endpoint(
    summary="Check the hash chain.", scope="audit:read", answer=ChainReport,
)
async def verify(request: Request, who: Principal) -> Response:
    return json_response(await verify_chain(request.state.log))


@endpoint(
    summary="The head's position and hash, to check later that the log still extends it.",
    scope="audit:read", answer=schemas.Digest,
)
async def digest(request: Request, who: Principal) -> Response:
    log = request.state.log
    head = await log.read_head()
    if head == 0:
        return json_response(schemas.Digest(position=0, hash=GENESIS_HASH))
    page = await log.read_all(head - 1, 1, until=head)
    return json_response(schemas.Digest(position=head, hash=page.events[0].hash))


def routes() -> list[Route]:
    return [
        Route("/events", list_events, methods=["GET"]),
        Route("/audit/verify", verify, methods=["GET"]),
        Route("/audit/digest", digest, methods=["GET"]),
    ]
