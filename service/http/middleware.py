"""One pure ASGI middleware for what every request goes through: a request id, the API key,
the per-key rate limit, and one access-log line. Query strings are never logged: they may
carry `access_token`."""

from __future__ import annotations

import math
import re
import time

from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from events import StorageError
from service.http.bodies import whole_number
from service.http.logs import access_line
from service.http.errors import HttpError, body_too_large, error_response, storage_unavailable
from service.http.ratelimit import RateLimiter
from service.api.artifacts import takes_upload
from service.api.stream import PATH as STREAM_PATH
from service.ids import new_id

PUBLIC = ("/healthz", "/readyz", "/openapi.json", "/")
PUBLIC_PREFIXES = ("/static/",)
REQUEST_ID = re.compile(r"[\x20-\x7e]{1,200}")
"""A client's X-Request-ID is kept (in every event's meta) only if it is printable ASCII."""


def request_id_of(headers: dict[bytes, bytes]) -> str:
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if REQUEST_ID.fullmatch(given) else new_id()  # replaced whole, never cut


def header_values(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name, the first of a repeated one (as Starlette's `Headers.get`),
    gathered once: each `Headers.get` walks them all again."""
    values: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        values.setdefault(name, value)
    return values


class ApiMiddleware:
    def __init__(self, app: ASGIApp, *, state):
        self.app = app
        self.state = state  # the app's state: settings, metrics (the log and read models are in the lifespan state)
        self.limiter: RateLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # fail closed: nothing here authenticates a websocket
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = header_values(scope)
        request_id = request_id_of(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            rejected = await self._admit(scope, headers)
            if rejected is not None:
                response = error_response(rejected.status, rejected.code, rejected.detail, rejected.headers)
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            endpoint = scope.get("endpoint")
            route = getattr(endpoint, "__name__", "unmatched")
            seconds = time.perf_counter() - started
            access_line(
                method=scope["method"], path=scope["path"], route=route, status=status,
                ms=round(seconds * 1000, 2), request_id=request_id,
            )
            metrics = getattr(self.state, "metrics", None)
            if metrics is not None:
                metrics.observe_request(scope["method"], route, status, seconds)

    async def _admit(self, scope: Scope, headers: dict[bytes, bytes]) -> HttpError | None:
        path = scope["path"]
        if scope.get("query_string"):
            empty = next((name for name, value in QueryParams(scope["query_string"]).multi_items() if not value), None)
            if empty is not None:  # one rule for every route: `limit=` is neither the default nor a value
                return HttpError(
                    400, "invalid_request", f"Query parameter {empty[:40]!r} is empty; give it a value or leave it out."
                )
        settings = self.state.settings
        if path in PUBLIC or path.startswith(PUBLIC_PREFIXES) or (path == "/metrics" and settings.metrics_public):
            return None
        token = None
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = credentials.strip()
        elif path == STREAM_PATH:  # browsers' EventSource cannot send headers
            token = QueryParams(scope.get("query_string", b"")).get("access_token")
        try:
            principal = await scope["state"]["keys"].principal(token)  # the lifespan state
        except HttpError as rejected:
            return rejected
        except StorageError:  # the key cannot be looked up just now: the app's own answer to it
            return storage_unavailable()
        if self.limiter is None:
            self.limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
        wait = self.limiter.take(principal.key_id)
        if wait > 0:
            return HttpError(
                429, "rate_limited", "Too many requests for this API key; slow down.",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        declared = headers.get(b"content-length", b"").decode("latin-1")
        size = whole_number(declared) if declared else 0
        # For every route; read_raw_body (an upload: the artifact store) counts chunked ones.
        limit = settings.max_artifact_bytes if takes_upload(scope["method"], path) else settings.max_body_bytes
        if size is None or size > limit:
            return body_too_large(limit)
        scope["state"]["principal"] = principal
        return None
