"""GET /openapi.json: an OpenAPI 3.1 document built from the app's own routes and the msgspec
types its handlers decode and encode.

Paths and methods come from the routes; what a route's handler cannot tell about itself (the
body type it decodes, the type it answers, its query parameters, the statuses it may answer)
is declared once, in OPERATIONS, keyed by the handler's name. A route missing there fails the
build, so nothing is served undocumented.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from events import RecordedEvent
from events.verify import ChainReport
from events.types import EVENT_TYPES
from projections.agents import Agent
from projections.approvals import APPROVAL_STATUSES
from projections import lifecycle
from projections.lifecycle import STATUSES
from projections.projects import Project
from projections.tasks import Task
from service.api import schemas
from service.work.agents.kinds import KINDS
from service.http.bodies import API_PREFIX, JSON_SAFE_INTEGER, MAX_INT, Error

REF = "#/components/schemas/{name}"
TITLE = "Mission Control"


# The few answers that handlers build as plain dicts.


class Health(msgspec.Struct):
    status: Literal["ok"]


class Readiness(msgspec.Struct):
    ready: bool
    head: int
    projected: int
    """The log position the read models have folded up to."""


class Accepted(msgspec.Struct, rename="camel"):
    accepted: bool
    task_id: str


class Param(msgspec.Struct, frozen=True):
    name: str
    schema: dict[str, Any]
    description: str
    where: Literal["query", "header"] = "query"


class Op(msgspec.Struct, frozen=True, kw_only=True):
    summary: str
    scope: str | None
    """The scope the route needs; None for a public route."""
    body: Any = None
    """The msgspec type the handler decodes its JSON body into, if it takes one."""
    body_required: bool = True
    status: int = 200
    answer: Any = None
    """The msgspec type the handler encodes its JSON answer from; None for an empty or non-JSON one."""
    media: str = "application/json"
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    """Statuses beyond those every route of its kind may answer (see `_errors`)."""
    headers: tuple[str, ...] = ()
    """Response headers of the success answer, from HEADERS."""
    same_answer: tuple[int, ...] = ()
    """Statuses answered with the success answer's body (readyz's 503)."""
    alternative: tuple[str, str] | None = None
    """Another media type of the success answer and what it holds."""


def _int(minimum: int, maximum: int = MAX_INT, default: int | None = None) -> dict[str, Any]:
    """A query integer: digits only, and never past what SQLite binds."""
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum, "maximum": maximum}
    if default is not None:
        schema["default"] = default
    return schema


UUID = {"type": "string", "format": "uuid"}
TEXT = {"type": "string"}
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

HEADERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ETag": ("The task's version, quoted.", TEXT),
    "Location": ("Where the created resource lives.", TEXT),
    "X-Total-Count": ("How many tasks match, across every page.", {"type": "integer"}),
    "X-Next-After": ("The position to pass as `after` for the next page.", {"type": "integer"}),
}

SSE_EVENT = {
    "description": "One Server-Sent Event (the stream is a sequence of them, and comment heartbeats).",
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "The event's log position."},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": REF.format(name="RecordedEvent")}},
        "event": {"const": "message"},
        "retry": {"type": "integer"},
    },
    "required": ["id", "data"],
}

_TASK = ("ETag",)
_WRONG_STATUS = (409,)  # the task is not in the status the operation needs

OPERATIONS: dict[str, Op] = {
    # --- service ------------------------------------------------------------------------
    "dashboard": Op(summary="The dashboard: a web page to watch and steer tasks.", scope=None, media="text/html"),
    "openapi_json": Op(summary="This document.", scope=None, answer=dict[str, Any]),
    "healthz": Op(summary="The process is alive.", scope=None, answer=Health),
    "readyz": Op(summary="The log is open and the read models have caught up (503 until then).", scope=None,
                 answer=Readiness, same_answer=(503,)),
    "metrics": Op(summary="Prometheus metrics (public when MC_METRICS_PUBLIC=1).", scope="admin",
                  media="text/plain"),
    # --- tasks --------------------------------------------------------------------------
    "list_tasks": Op(
        summary="List tasks, newest first.", scope="task:read", answer=list[Task], headers=("X-Total-Count",),
        params=(
            Param("status", {"type": "string", "pattern": rf"^({'|'.join(STATUSES)})(,({'|'.join(STATUSES)}))*$"},
                  "One status or a comma list."),
            Param("desktopId", TEXT, "Only tasks for this machine."),
            Param("agentId", UUID, "Only tasks of this agent."),
            Param("projectId", UUID, "Only tasks of this project."),
            Param("search", TEXT, "A substring of the title or content."),
            Param("archived", {"enum": ["true", "false", "all"], "default": "false"}, "Archived tasks too, or only."),
            Param("limit", _int(1, 500, 50), "Page size."),
            Param("offset", _int(0, default=0), "Tasks to skip."),
        ),
    ),
    "create_task": Op(
        summary="Create a task.", scope="task:write", body=schemas.CreateTask, status=201, answer=Task,
        headers=("Location", *_TASK), params=(IDEMPOTENCY,), errors=(404, 409),
    ),
    "get_task": Op(
        summary="A task, or as it stood at a log position.", scope="task:read", answer=Task, headers=_TASK,
        params=(Param("asOf", _int(0), "A log position: the task as it stood then."),),
    ),
    "update_task": Op(
        summary="Change a pending task (title, metadata and archived: any time).", scope="task:write",
        body=schemas.UpdateTask, answer=Task, headers=_TASK, params=(IF_MATCH, IDEMPOTENCY), errors=(409, 412),
    ),
    "delete_task": Op(
        summary="Archive a task (a tombstone event; the log keeps everything).", scope="task:write", status=204,
        body=schemas.Body, body_required=False, params=(IF_MATCH,), errors=(409, 412),
    ),
    "run_task": Op(
        summary="Start a run of a pending task on an agent (default: the task's, else echo).", scope="task:write",
        body=schemas.RunTask, body_required=False, answer=Task, headers=_TASK, params=(IDEMPOTENCY,),
        errors=(409, 503),
    ),
    "cancel_task": Op(
        summary="Cancel a task and stop its run.", scope="task:write", body=schemas.CancelTask, body_required=False,
        answer=Task, headers=_TASK, params=(IDEMPOTENCY,), errors=_WRONG_STATUS,
    ),
    "retry_task": Op(
        summary="Put a failed or cancelled task back to pending.", scope="task:write", body=schemas.Body,
        body_required=False, answer=Task, headers=_TASK, params=(IDEMPOTENCY,), errors=_WRONG_STATUS,
    ),
    "send_message": Op(
        summary="Send a message to the running agent.", scope="task:write", body=schemas.SendMessage, status=202,
        answer=Accepted, params=(IDEMPOTENCY,), errors=_WRONG_STATUS,
    ),
    "review_task": Op(
        summary="Approve or reject a task in review.", scope="approval:write", body=schemas.ReviewBody,
        answer=Task, headers=_TASK, params=(IDEMPOTENCY,), errors=_WRONG_STATUS,
    ),
    "mark_presence": Op(
        summary="Mark a device as watching the task for 60 s.", scope="task:write", body=schemas.PresenceBody,
        status=204, errors=_WRONG_STATUS,
    ),
    "clear_presence": Op(
        summary="A device stops watching the task.", scope="task:write", body=schemas.PresenceBody,
        body_required=False, status=204,
        params=(Param("deviceId", {"type": "string", "minLength": 1, "maxLength": 200},
                      "The device, if not in the body: one of the two is required (if both, they must agree)."),),
        errors=_WRONG_STATUS,
    ),
    "task_events": Op(
        summary="The task's events in order: the auditor's view.", scope="task:read", answer=list[RecordedEvent],
        headers=("X-Next-After",),
        params=(Param("after", _int(0, default=0), "A log position to start after."),
                Param("limit", _int(1, 5000, 500), "Page size.")),
    ),
    "task_output": Op(
        summary="A run's output as the agent wrote it.", scope="task:read", media="text/plain",
        params=(Param("runId", UUID, "The run (default: the current or last)."),),
    ),
    # --- approvals ----------------------------------------------------------------------
    "list_approvals": Op(
        summary="Approvals, oldest first.", scope="task:read", answer=list[schemas.ApprovalOut],
        params=(Param("status", {"enum": [*APPROVAL_STATUSES, "all"], "default": "pending"},
                      "Which approvals."),),
    ),
    "get_approval": Op(summary="An approval.", scope="task:read", answer=schemas.ApprovalOut),
    "resolve": Op(
        summary="Approve or reject: the task moves to done or failed in the same append.",
        scope="approval:write", body=schemas.ReviewBody, answer=schemas.ApprovalOut, params=(IDEMPOTENCY,),
        errors=_WRONG_STATUS,
    ),
    # --- agents and projects ------------------------------------------------------------
    "list_agents": Op(summary="Agents.", scope="task:read", answer=list[Agent]),
    "create_agent": Op(
        summary="Register an agent (a shell agent: admin only).", scope="agent:write", body=schemas.CreateAgent,
        status=201, answer=Agent, headers=("Location",), params=(IDEMPOTENCY,), errors=(409,),
    ),
    "get_agent": Op(summary="An agent.", scope="task:read", answer=Agent),
    "update_agent": Op(
        summary="Change an agent.", scope="agent:write", body=schemas.UpdateAgent, answer=Agent,
        params=(IDEMPOTENCY,), errors=(409,),
    ),
    "pause_agent": Op(summary="Pause an agent: runs on it are refused (503).", scope="agent:write", answer=Agent,
                      body=schemas.Body, body_required=False, params=(IDEMPOTENCY,), errors=(409,)),
    "resume_agent": Op(summary="Resume a paused agent.", scope="agent:write", answer=Agent, body=schemas.Body,
                       body_required=False, params=(IDEMPOTENCY,), errors=(409,)),
    "list_projects": Op(summary="Projects the caller belongs to.", scope="task:read", answer=list[Project]),
    "create_project": Op(
        summary="Create a project.", scope="admin", body=schemas.CreateProject, status=201, answer=Project,
        headers=("Location",), params=(IDEMPOTENCY,), errors=(409,),
    ),
    "get_project": Op(summary="A project.", scope="task:read", answer=Project),
    "update_project": Op(
        summary="Change a project.", scope="admin", body=schemas.UpdateProject, answer=Project,
        params=(IDEMPOTENCY,), errors=(409,),
    ),
    # --- the log ------------------------------------------------------------------------
    "list_events": Op(
        summary="A page of the log (or all of it as NDJSON with Accept: application/x-ndjson).",
        scope="audit:read", answer=schemas.EventsPage,
        alternative=("application/x-ndjson", "One recorded event a line, every match up to the head."),
        params=(Param("after", _int(0, default=0), "A log position to start after."),
                Param("limit", _int(1, 5000, 500), "Page size (JSON only)."),
                Param("stream", TEXT, "Only this stream (`task-<id>`)."), TYPES),
    ),
    "verify": Op(summary="Check the hash chain.", scope="audit:read", answer=ChainReport),
    "digest": Op(summary="The head's position and hash, to check later that the log still extends it.",
                 scope="audit:read", answer=schemas.Digest),
    "overview": Op(summary="Counts, resources and the log's head.", scope="task:read", answer=schemas.Overview),
    "activity_stream": Op(
        summary="The log's tail as Server-Sent Events: `id: <position>`, `data: <recorded event>`.",
        scope="task:read", media="text/event-stream",
        params=(
            Param("after", _int(0), "A log position to resume after."),
            Param("Last-Event-ID", {"type": "string", "pattern": "^[0-9]+$"},
                  "Resume after this position (EventSource sends it when it reconnects).", "header"),
            TYPES,
            Param("taskId", UUID, "Only this task's events."),
            Param("stream", TEXT, "Only this stream."),
            Param("access_token", TEXT, "The API key, for EventSource, which cannot send headers."),
        ),
    ),
}

_ERROR_WORDS = {
    400: "Malformed JSON, a wrong type or value, a bad query parameter or id.",
    401: "No key, an unknown or a revoked key.",
    403: "The key lacks the scope this route needs.",
    404: "Not found, or not in a project of the caller.",
    409: "The task is not in the status this needs, the resource changed meanwhile, or an Idempotency-Key was "
         "used with another body.",
    412: "If-Match differs from the task's version.",
    413: "The body is over the limit.",
    415: "The body is not application/json.",
    429: "Too many requests for this key, or the concurrency limit on runs; see Retry-After.",
    503: "The agent is not active, the service is not ready or is shutting down.",
}


LIFECYCLE: dict[str, lifecycle.Command] = {
    "update_task": "edit", "run_task": "run", "cancel_task": "cancel", "retry_task": "retry",
    "send_message": "message", "review_task": "review", "resolve": "review",
}
"""Operations that the task's status may refuse (409), and the lifecycle command each asks for."""


def _error_words(name: str, status: int) -> str:
    if status == 409 and name in LIFECYCLE:
        allowed = lifecycle.either(lifecycle.admitting(LIFECYCLE[name]))
        return (f"The task's status is not {allowed}, the resource changed meanwhile, or an Idempotency-Key "
                "was used with another body.")
    return _ERROR_WORDS[status]


def _errors(op: Op, path_params: list[str]) -> list[int]:
    found = set(op.errors)
    if op.scope is not None:
        found |= {401, 403, 429}
    if path_params or op.params:
        found |= {400}
    if path_params:
        found |= {404}
    if op.body is not None:
        found |= {400, 413, 415}
    if op.scope is not None:
        found |= {503}  # the log refuses work while the service shuts down
    return sorted(found)


def _success(op: Op, schema: dict[str, Any] | None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": op.summary}
    if op.headers:
        answer["headers"] = {h: {"description": HEADERS[h][0], "schema": HEADERS[h][1]} for h in op.headers}
    if op.status == 204:
        return answer
    if op.media == "text/event-stream":
        schema = SSE_EVENT
    content = {op.media: {"schema": schema if schema is not None else {"type": "string"}}}
    if op.alternative is not None:
        media, what = op.alternative
        content[media] = {"schema": {"type": "string", "description": what}}
    answer["content"] = content
    return answer


def _operation(path: str, name: str, op: Op, path_params: list[str], schemas_of: dict[Any, dict]) -> dict[str, Any]:
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": UUID, "description": f"The {p.split('_')[0]}'s id."}
        for p in path_params
    ] + [{"name": p.name, "in": p.where, "required": False, "schema": _non_empty(p), "description": p.description}
         for p in op.params]
    responses = {str(op.status): _success(op, schemas_of.get(op.answer))}
    for status in op.same_answer:
        responses[str(status)] = responses[str(op.status)]
    for status in _errors(op, path_params):
        if str(status) in responses:
            continue
        error: dict[str, Any] = {
            "description": _error_words(name, status),
            "content": {"application/json": {"schema": {"$ref": REF.format(name="Error")}}},
        }
        if status in (429, 503):
            error["headers"] = {"Retry-After": {"description": "Seconds to wait.", "schema": TEXT}}
        if status == 401:
            error["headers"] = {"WWW-Authenticate": {"description": "`Bearer`.", "schema": TEXT}}
        responses[str(status)] = error
    operation: dict[str, Any] = {
        "operationId": name,
        "summary": op.summary,
        "tags": [_tag(path)],
        "parameters": parameters,
        "responses": responses,
    }
    if op.scope is None:
        operation["security"] = []
    else:
        operation["description"] = f"Needs the `{op.scope}` scope (`admin` implies every scope)."
        operation["security"] = [{"bearer": [op.scope]}]
        if name == "activity_stream":
            operation["security"].append({"accessToken": [op.scope]})
    if op.body is not None:
        operation["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": schemas_of[op.body]}},
        }
    return operation


def _non_empty(param: Param) -> dict[str, Any]:
    """A query value is never empty (the middleware refuses `?limit=` on every route)."""
    if param.where == "query" and param.schema.get("type") == "string" and "minLength" not in param.schema:
        return {**param.schema, "minLength": 1}
    return param.schema


def _tag(path: str) -> str:
    """The resource a path is under (`tasks`, `agents`, `audit`, ...), or `service` for the root's."""
    rest = path.removeprefix(API_PREFIX + "/")
    return "service" if rest == path else rest.split("/")[0]


def build(routes: list) -> dict[str, Any]:
    """The OpenAPI document of these routes; raises if a route has no entry in OPERATIONS."""
    endpoints = [r for r in routes if isinstance(r, Route)]
    missing = sorted({r.endpoint.__name__ for r in endpoints} - OPERATIONS.keys())
    if missing:
        raise LookupError(f"routes without an OpenAPI entry in service/openapi.py: {', '.join(missing)}")
    configs = {kind.config for kind in KINDS.values() if kind.config is not None}
    bodies = {op.body for op in OPERATIONS.values() if op.body is not None}
    types = sorted(bodies | configs | {op.answer for op in OPERATIONS.values() if op.answer is not None} | {Error},
                   key=repr)
    generated, components = msgspec.json.schema_components(types, ref_template=REF)
    schemas_of = dict(zip(types, generated))
    for body in bodies | configs:  # what the body checks refuse, beyond the types: say it
        _as_checked(components[body.__name__])
    components[schemas.CreateAgent.__name__] = _by_kind(components, schemas.CreateAgent.__name__)
    components[JSON_VALUE_NAME] = JSON_VALUE
    paths: dict[str, dict[str, Any]] = {}
    for route in endpoints:
        name = route.endpoint.__name__
        params = list(route.param_convertors)
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            paths.setdefault(route.path, {})[method.lower()] = _operation(
                route.path, name, OPERATIONS[name], params, schemas_of
            )
    _link_created(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": _version(),
            "description": "Hand tasks to AI agents and shell workers, watch them run live, approve what they "
                           "deliver, and prove afterwards what happened. Every answer carries `X-Request-ID`; "
                           "every error is `{\"detail\": ..., \"code\": ...}`.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key: `mc_...`."},
                "accessToken": {"type": "apiKey", "in": "query", "name": "access_token",
                                "description": "The API key in the query: the activity stream only."},
            },
        },
    }


NO_NUL = "^[^\\u0000]*$"
SAFE_INTEGER = {"type": "integer", "minimum": -JSON_SAFE_INTEGER, "maximum": JSON_SAFE_INTEGER}
JSON_VALUE_NAME = "JsonValue"
JSON_VALUE = {
    "description": "A value an event can hold: no fractions or exponents (send decimals as strings), integers "
                   "within ±(2^53 − 1), strings without NUL, at most 32 levels deep, keys given once per object.",
    "anyOf": [
        {"type": "string", "pattern": NO_NUL}, SAFE_INTEGER, {"type": "boolean"}, {"type": "null"},
        {"type": "array", "items": {"$ref": REF.format(name=JSON_VALUE_NAME)}},
        {"type": "object", "additionalProperties": {"$ref": REF.format(name=JSON_VALUE_NAME)}},
    ],
}


def _as_checked(schema: Any) -> None:
    """A request body's schema as `service.http.bodies.decode_body` enforces it: strings without NUL, integers
    within ±(2^53 − 1), free-form objects of JSON values, numbers without fractions (a config's
    decimal is sent as a string)."""
    if isinstance(schema, list):
        for item in schema:
            _as_checked(item)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind == "string" and not {"pattern", "format", "enum", "const"} & schema.keys():
        schema["pattern"] = NO_NUL
    elif kind == "integer":
        if "exclusiveMinimum" not in schema:
            schema.setdefault("minimum", SAFE_INTEGER["minimum"])
        if "exclusiveMaximum" not in schema:
            schema.setdefault("maximum", SAFE_INTEGER["maximum"])
    elif kind == "number":
        schema["type"] = "integer"  # a decimal goes as a string ("0.5"), which the document leaves unsaid
        schema.pop("default", None)  # a float default would read as a fraction the body may hold
    elif kind == "object" and "properties" not in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = {"$ref": REF.format(name=JSON_VALUE_NAME)}
    for value in list(schema.values()):
        _as_checked(value)


def _by_kind(components: dict[str, Any], name: str) -> dict[str, Any]:
    """CreateAgent as one variant per agent kind, each with the config that kind requires."""
    base = components[name]
    variants = []
    for kind, spec in KINDS.items():
        variant = {**base, "properties": {**base["properties"], "kind": {"const": kind}}}
        if spec.config is not None:
            config = spec.config.__name__
            variant["properties"]["config"] = {"$ref": REF.format(name=config)}
            if components[config].get("required"):
                variant["required"] = [*base.get("required", ()), "config"]
        variants.append(variant)
    return {"title": base.get("title", name), "oneOf": variants}


def _link_created(paths: dict[str, dict[str, Any]]) -> None:
    """Links from each answer that creates a resource to the operations on it (its id in the path), so
    clients and stateful testers can follow from `POST /tasks` to `/tasks/{task_id}/run` and the rest."""
    for collection, methods in paths.items():
        created = methods.get("post", {}).get("responses", {}).get("201")
        if created is None:
            continue
        links = created.setdefault("links", {})
        for path, operations in paths.items():
            param, _, _ = path.removeprefix(collection + "/{").partition("}")
            if path == collection or not path.startswith(collection + "/{"):
                continue
            for operation in operations.values():
                links[operation["operationId"]] = {
                    "operationId": operation["operationId"],
                    "parameters": {f"path.{param}": "$response.body#/id"},
                }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mission-control")
    except PackageNotFoundError:
        return "0"


async def openapi_json(request: Request) -> Response:
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = msgspec.json.encode(build(request.app.routes))
    return Response(state.openapi, media_type="application/json")


def route() -> Route:
    return Route("/openapi.json", openapi_json, methods=["GET"])

