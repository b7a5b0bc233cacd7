"""GET /activity/stream: the log's tail as Server-Sent Events.

What a consumer can rely on, and why it holds:
- Exactness. Events come from the log's own tail (history after `after` / `Last-Event-ID`,
  then live), which reads committed events by position: no gap or repeat at the seam, and a
  reconnect with the last id seen resumes exactly. A filtered stream resumes the same way,
  since the ids it sends are the positions of the events it sent.
- Bounded memory per client. The tail hands over at most a page of events at a time, and the
  next page is read only once the previous one was written: uvicorn's `send` waits while the
  socket's buffer is above its high-water mark. A slow client therefore costs one page, never
  a queue, and catches up from the log; one that takes nothing for `send_timeout_seconds`
  is dropped.
- Vanishing clients and shutdown end the response's tasks (sse-starlette's task group); on
  shutdown the chunked body is closed properly, so clients see a clean end and reconnect.
"""

from __future__ import annotations

import contextlib
import time

import anyio
import msgspec
import structlog
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from events import RecordedEvent, StorageError
from events import streams as stream_names
from service.api.tenancy import Tenancy
from service.http.auth import Principal
from service.http.endpoints import TEXT, TYPES, UUID, Param, endpoint, whole
from service.api import API_PREFIX
from service.http.bodies import parse_uuid, whole_number
from service.http.errors import bad_request
from service.http.logs import client_dropped
from service.api.log import type_filter

PATH = f"{API_PREFIX}/activity/stream"
"""The one route whose key may come in the query (the middleware reads it before routing)."""
RETRY_MS = 2000
PAGE = 200
"""Log positions a client is handed at a time (the most one client makes the server hold)."""
CHUNK_BYTES = 64 * 1024
"""Frames are written together up to this size: one write per page, not per event."""

HELLO = b": connected\r\nretry: %d\r\n\r\n" % RETRY_MS
_encoder = msgspec.json.Encoder()
logger = structlog.get_logger("mission_control.stream")


def frame(event: RecordedEvent) -> bytes:
    # Compact JSON has no line breaks, so one `data:` line carries the whole event; no
    # `event:` field, so EventSource.onmessage sees everything.
    return b"id: %d\r\ndata: %s\r\n\r\n" % (event.position, _encoder.encode(event))


def resume_position(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    position = whole_number(raw.strip())
    if position is None:
        raise bad_request("Last-Event-ID and after must be a log position (a whole number).")
    return position


def stream_filter(request: Request) -> list[str] | None:
    """The streams asked for: None for all, [] when `taskId` and `stream` exclude each other."""
    streams = None
    if (task_id := request.query_params.get("taskId")) is not None:
        task_id = parse_uuid(task_id, "taskId")
        streams = [stream_names.task(task_id), stream_names.presence(task_id)]
    if (stream := request.query_params.get("stream")) is not None:
        streams = [s for s in (streams or [stream]) if s == stream]
    return streams


def _only_send_timeouts(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_send_timeouts(e) for e in exc.exceptions)
    return isinstance(exc, SendTimeoutError)


class EventStream(EventSourceResponse):
    """sse-starlette's response, ending the way a long-lived stream should: a client that stopped
    reading is a warning, not a server error. (A stream cut by the server's shutdown sse-starlette
    ends itself, since 3.7, with the chunked body's end: the client sees a clean end and
    reconnects elsewhere with its Last-Event-ID.)"""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as exc:
            if not _only_send_timeouts(exc):
                raise
            # A client that stopped reading: expected in production, not a server error.
            client_dropped.set(True)
            logger.warning(
                "stream client dropped", reason=f"took no data for {self.send_timeout} s",
                request_id=scope.get("state", {}).get("request_id"),
            )
            return


@endpoint(
    summary="The log's tail as Server-Sent Events: `id: <position>`, `data: <recorded event>`.",
    scope="task:read", media="text/event-stream", token_in_query=True,
    params=(
        Param("after", whole(0), "A log position to resume after."),
        Param("Last-Event-ID", {"type": "string", "pattern": "^[0-9]+$"},
              "Resume after this position (EventSource sends it when it reconnects).", "header"),
        TYPES,
        Param("taskId", UUID, "Only this task's events."),
        Param("stream", TEXT, "Only this stream."),
        Param("access_token", TEXT, "The API key, for EventSource, which cannot send headers."),
    ),
)
async def activity_stream(request: Request, who: Principal) -> Response:
    after = resume_position(request)
    types = type_filter(request)
    streams = stream_filter(request)
    log = request.state.log
    settings = request.app.state.settings
    tenancy = Tenancy(request.state.models, who)
    await tenancy.prepare()
    checked_at = time.monotonic()

    async def key_still_valid() -> bool:
        """A revoked key's stream ends: nothing reaches it a second after the revocation."""
        nonlocal checked_at
        if time.monotonic() - checked_at < 1:
            return True
        checked_at = time.monotonic()
        key = await request.state.models.api_key(who.key_id)
        return key is not None and not key.revoked

    async def body():
        yield HELLO
        if streams == []:
            await anyio.sleep_forever()  # nothing can match: heartbeats only
        try:
            async with contextlib.aclosing(log.tail_pages(after, streams=streams, types=types, page=PAGE)) as pages:
                async for events in pages:
                    if not await key_still_valid():
                        return
                    chunk: list[bytes] = []
                    size = 0
                    for event in events:
                        if tenancy.everything or await tenancy.admits(event):
                            chunk.append(data := frame(event))
                            size += len(data)
                            if size >= CHUNK_BYTES:
                                yield b"".join(chunk)
                                chunk, size = [], 0
                    if chunk:
                        yield b"".join(chunk)
        except StorageError:  # the database away: end cleanly, and the client resumes from its Last-Event-ID
            logger.warning("stream ended: the log's storage failed",
                           request_id=getattr(request.state, "request_id", None))

    return EventStream(
        body(), ping=settings.heartbeat_seconds, send_timeout=settings.send_timeout_seconds,
        headers={"Cache-Control": "no-store"},
    )


def routes() -> list[Route]:
    return [Route(PATH.removeprefix(API_PREFIX), activity_stream, methods=["GET"])]
