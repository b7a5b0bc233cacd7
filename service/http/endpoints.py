"""What each endpoint declares about itself, once, on the handler: the scope it needs, the body it
decodes, what it answers, its query parameters and statuses. The wrapper enforces the scope and
decodes the body as declared, and the OpenAPI builder (service/http/openapi.py) reads the same
declaration, walking the routes through their Mounts: the two cannot differ.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from events.types import EVENT_TYPES
from projections import lifecycle
from service.artifacts import MAX_NAME, SHA256
from service.http.auth import DESKTOP_NAME, Principal
from service.http.bodies import MAX_INT, read_body


class Param(msgspec.Struct, frozen=True):
    name: str
    schema: dict[str, Any]
    description: str
    where: Literal["query", "header"] = "query"
    required: bool = False


def whole(minimum: int, maximum: int = MAX_INT, default: int | None = None) -> dict[str, Any]:
    """A query integer: digits only, and never past what SQLite binds."""
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum, "maximum": maximum}
    if default is not None:
        schema["default"] = default
    return schema


UUID = {"type": "string", "format": "uuid"}
TEXT = {"type": "string"}
DESKTOP = {"type": "string", "pattern": DESKTOP_NAME.pattern}
PATH_PARAMS = {
    "desktop_id": DESKTOP, "device_id": {"type": "string", "minLength": 1, "maxLength": 200},
    "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME}, "sha256": {"type": "string", "pattern": SHA256.pattern},
}
"""A path parameter's schema when it is not a UUID."""
LEASE = Param("MC-Lease", {"type": "string", "pattern": r"^[^:]+:[0-9]{1,18}$"},
              "The run's lease token, `<runId>:<epoch>`, as its assignment gave it.", "header", required=True)
IDEMPOTENCY = Param("Idempotency-Key", {"type": "string", "minLength": 1, "maxLength": 200},
                    "Repeat the request safely: the same key with the same body answers the same, appending nothing.",
                    "header")
_TAG = r'(W/)?"?[0-9]{1,18}"?'
IF_MATCH = Param(
    "If-Match", {"type": "string", "pattern": rf"^\s*(\*|{_TAG}(\s*,\s*{_TAG})*)\s*$"},
    'The task version (its ETag) the change is meant for: `3`, `"3"`, `W/"3"`, a comma list, or `*`; 412 if it '
    "moved.", "header")
_FAMILIES = sorted({name.split(".")[0] for name in EVENT_TYPES})
_TYPE_NAMES = "|".join([n.replace(".", r"\.") for n in sorted(EVENT_TYPES)] + [rf"{f}\.\*?" for f in _FAMILIES])
TYPES = Param(
    "types", {"type": "string", "pattern": rf"^({_TYPE_NAMES})(,({_TYPE_NAMES}))*$"},
    "Comma list of event types; one ending in `.` or `*` is a prefix (`task.`). A name that is no event type, "
    f"nor the prefix of one, is refused. The types: {', '.join(f'`{n}`' for n in sorted(EVENT_TYPES))}.")


class Declaration(msgspec.Struct, frozen=True, kw_only=True):
    summary: str
    scope: str | None
    """The scope the route needs; None for a public route."""
    public_if: str | None = None
    """A setting that, when true, makes the route public (`metrics_public`)."""
    body: Any = None
    """The msgspec type the JSON body is decoded into, if the route takes one."""
    body_required: bool = True
    upload: bool = False
    """The body is a file's bytes, of any content type, up to `max_artifact_bytes` (not JSON)."""
    status: int = 200
    answer: Any = None
    """The msgspec type the JSON answer is encoded from; None for an empty or non-JSON one."""
    media: str = "application/json"
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    """Statuses beyond those every route of its kind may answer (see `openapi._errors`)."""
    needs: lifecycle.Command | None = None
    """The lifecycle command the task's status must admit (else 409), as the decider asks it."""
    headers: tuple[str, ...] = ()
    """Response headers of the success answer, from `openapi.HEADERS`."""
    same_answer: tuple[int, ...] = ()
    """Statuses answered with the success answer's body (readyz's 503)."""
    alternative: tuple[str, str] | None = None
    """Another media type of the success answer and what it holds."""
    token_in_query: bool = False
    """The key may come as `?access_token=` (EventSource cannot send headers)."""


Handler = Callable[[Request, Principal | None], Awaitable[Response]]


def endpoint(**declared: Any) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Declares a handler: `handler(request, who)` is called with the caller, refused 403 first
    without the declared scope (`who` is None on a public route); `await body(request)` decodes
    the body as declared."""
    declaration = Declaration(**declared)

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)  # the access log and metrics label requests by the handler's name
        async def checked(request: Request) -> Response:
            return await handler(request, _caller(request, declaration))

        checked.declaration = declaration  # type: ignore[attr-defined]
        return checked

    return wrap


def _caller(request: Request, declaration: Declaration) -> Principal | None:
    if declaration.scope is None or (
        declaration.public_if and getattr(request.app.state.settings, declaration.public_if)
    ):
        return None
    who: Principal = request.state.principal  # authenticated by the middleware
    who.require(declaration.scope)
    return who


def declaration_of(route: Route) -> Declaration:
    found = getattr(route.endpoint, "declaration", None)
    if found is None:
        raise LookupError(f"{route.path} ({route.endpoint.__name__}) is not declared with @endpoint")
    return found


async def declared_body(request: Request, required: bool | None = None) -> tuple[bytes, Any]:
    """The raw body (for Idempotency-Key fingerprints) and its value as the endpoint declares it;
    (b"", None) when an optional body is absent. `required` narrows an optional body for this request."""
    declared: Declaration = request.scope["endpoint"].declaration
    return await read_body(request, declared.body, declared.body_required if required is None else required)


def documented_path(path: str) -> str:
    """A route's path as OpenAPI writes it: without Starlette's convertors (`{name:path}` is `{name}`)."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def walk(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, Route]]:
    """(full path, route) of every route, through Mounts (a Mount of files has no routes); the path as
    OpenAPI writes it."""
    for route in routes:
        if isinstance(route, Mount):
            yield from walk(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            yield documented_path(prefix + route.path), route
