"""GET /openapi.json: an OpenAPI 3.1 document built from the app's own routes and the msgspec
types its handlers decode and encode.

Paths and methods come from the routes (walked through their Mounts); the rest (the scope, the
body type, the answer, query parameters, statuses) from the `@endpoint` declaration each handler
carries, the same one that enforces the scope and decodes the body at run time. A route without
one fails the build, so nothing is served undocumented.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import msgspec

from projections import lifecycle
from service.api import API_PREFIX, schemas
from service.http.bodies import JSON_SAFE_INTEGER
from service.http.errors import Error
from service.http.auth import WORKER
from service.http.endpoints import PATH_PARAMS, TEXT, UUID, Declaration, Param, declaration_of, walk
from service.work.agents.kinds import KINDS

REF = "#/components/schemas/{name}"
TITLE = "Mission Control"

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
    507: "The artifact store is out of space; nothing was recorded.",
    429: "Too many requests for this key, the concurrency limit on runs, or the desktop's capacity; see Retry-After.",
    503: "The agent is not active, the desktop is not online or hosts no such kind, the service is not ready or "
         "is shutting down.",
}


_WORKER_WORDS = {
    403: "The key is not a worker key issued for a desktop (an admin key names none).",
    404: "The run is not placed on the key's desktop, the body names a desktop that is not the key's, or the "
         "desktop has not registered.",
    409: "The run's lease is lost (`lease_lost`, the sentence says why), output before this is missing "
         "(`output_gap`, resend from the body's `expectedSeq`), the desktop must register again "
         "(`not_registered`), or it is a node's own (`invalid_status`).",
}


def _error_words(declared: Declaration, status: int) -> str:
    if declared.scope == WORKER and status in _WORKER_WORDS:
        return _WORKER_WORDS[status]
    if status == 409 and declared.needs is not None:
        allowed = lifecycle.either(lifecycle.admitting(declared.needs))
        return (f"The task's status is not {allowed}, the resource changed meanwhile, or an Idempotency-Key "
                "was used with another body.")
    return _ERROR_WORDS[status]


def _errors(op: Declaration, path_params: list[str]) -> list[int]:
    found = set(op.errors) | ({409} if op.needs else set())
    if op.scope is not None:
        found |= {401, 403, 429}
    if path_params or op.params:
        found |= {400}
    if path_params:
        found |= {404}
    if op.body is not None:
        found |= {400, 413, 415}
    if op.upload:
        found |= {400, 413, 507}
    if op.scope is not None:
        found |= {503}  # the log refuses work while the service shuts down
    return sorted(found)


def _success(op: Declaration, schema: dict[str, Any] | None) -> dict[str, Any]:
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


def _operation(path: str, name: str, op: Declaration, path_params: list[str], schemas_of: dict[Any, dict]) -> dict[str, Any]:
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": PATH_PARAMS.get(p, UUID),
         "description": f"The {p.split('_')[0]}'s id."}
        for p in path_params
    ] + [{"name": p.name, "in": p.where, "required": p.required, "schema": _non_empty(p), "description": p.description}
         for p in op.params]
    responses = {str(op.status): _success(op, schemas_of.get(op.answer))}
    for status in op.same_answer:
        responses[str(status)] = responses[str(op.status)]
    for status in _errors(op, path_params):
        if str(status) in responses:
            continue
        error: dict[str, Any] = {
            "description": _error_words(op, status),
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
        operation["description"] = (
            "Needs a key issued with `--scopes worker --desktop NAME`, and acts as that desktop (an `admin` key "
            "names no desktop: it is refused)." if op.scope == WORKER
            else f"Needs the `{op.scope}` scope (`admin` implies every scope).")
        operation["security"] = [{"bearer": [op.scope]}]
        if op.token_in_query:
            operation["security"].append({"accessToken": [op.scope]})
    if op.body is not None:
        operation["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": schemas_of[op.body]}},
        }
    if op.upload:
        operation["requestBody"] = {
            "required": True, "description": "The file's bytes, sent as they are; its Content-Type is recorded "
            "(default application/octet-stream). At most `MC_MAX_ARTIFACT_BYTES`; never empty.",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary", "minLength": 1}}},
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
    """The OpenAPI document of these routes; raises if a route carries no `@endpoint` declaration."""
    endpoints = [(path, route, declaration_of(route)) for path, route in walk(routes)]
    declared = [d for _, _, d in endpoints]
    configs = {kind.config for kind in KINDS.values() if kind.config is not None}
    bodies = {d.body for d in declared if d.body is not None}
    types = sorted(bodies | configs | {d.answer for d in declared if d.answer is not None} | {Error}, key=repr)
    generated, components = msgspec.json.schema_components(types, ref_template=REF)
    schemas_of = dict(zip(types, generated))
    _describe_fields(components, types)
    for body in bodies | configs:  # what the body checks refuse, beyond the types: say it
        _as_checked(components[body.__name__])
    components[schemas.CreateAgent.__name__] = _by_kind(components, schemas.CreateAgent.__name__)
    components[JSON_VALUE_NAME] = JSON_VALUE
    paths: dict[str, dict[str, Any]] = {}
    for path, route, declaration in endpoints:
        params = list(route.param_convertors)
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            paths.setdefault(path, {})[method.lower()] = _operation(
                path, route.endpoint.__name__, declaration, params, schemas_of
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


def _describe_fields(components: dict[str, Any], types: list[Any]) -> None:
    """A Struct field's docstring (the string written below it) as its property's description."""
    for struct in _structs(types, set()):
        component = components.get(struct.__name__)
        if component is None or "properties" not in component:
            continue
        encoded = {f.name: f.encode_name for f in msgspec.structs.fields(struct)}
        for field, words in field_docstrings(struct).items():
            prop = component["properties"].get(encoded.get(field, field))
            if prop is not None and "description" not in prop:
                prop["description"] = words


def _structs(types: Any, seen: set[type]):
    """Every Struct reachable from these types (through their fields' types too), each once."""
    for found in types if isinstance(types, (list, tuple, set)) else [types]:
        yield from _structs(list(getattr(found, "__args__", ())), seen)
        if isinstance(found, type) and issubclass(found, msgspec.Struct) and found not in seen:
            seen.add(found)
            yield found
            yield from _structs([f.type for f in msgspec.structs.fields(found)], seen)


def field_docstrings(struct: type) -> dict[str, str]:
    """Field name -> the string literal written right below its annotation, in the class and its bases."""
    found: dict[str, str] = {}
    for cls in reversed(struct.__mro__):
        if not issubclass(cls, msgspec.Struct) or cls is msgspec.Struct:
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
        except (OSError, TypeError):
            continue
        for statement, after in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                found[statement.target.id] = inspect.cleandoc(after.value.value)
    return found


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

