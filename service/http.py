"""HTTP plumbing shared by the routes: JSON in and out, and errors as API.md shapes them: an
HTTP-level refusal (`HttpError`), or a domain `Refused` given its status by one table."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.deciders import Code, Refused

T = TypeVar("T")

API_PREFIX = "/api/mission-control"
"""Where the API's resources live; /healthz, /readyz, /metrics and /openapi.json are at the root."""
MAX_INT = 2**63 - 1
"""The largest integer SQLite binds; a larger query parameter would be a 500."""

_encoder = msgspec.json.Encoder()
JSON_SAFE_INTEGER = 2**53 - 1
"""Past it RFC 8785 writes an integer as a double, so an auditor's JCS bytes would differ."""


class Error(msgspec.Struct):
    detail: str
    code: str


class HttpError(Exception):
    """A request refused for how it was sent (its body, its key, its rate), before any command."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


REFUSALS: dict[Code, int] = {
    "not_found": 404, "agent_not_found": 404,
    "forbidden": 403,
    "already_exists": 409, "invalid_status": 409, "agent_mismatch": 409, "dependency_not_done": 409,
    "run_over": 409, "conflict": 409, "idempotency_conflict": 409,
    "precondition_failed": 412,
    "concurrency_limit": 429,
    "agent_unavailable": 503,
}
"""The HTTP status of each domain refusal; one that says when to retry also sends Retry-After."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(body), status, headers, media_type="application/json")


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(Error(detail=detail, code=code), status, headers)


def refusal_response(refused: Refused) -> Response:
    headers = None if refused.retry_after is None else {"Retry-After": str(refused.retry_after)}
    return error_response(REFUSALS[refused.code], refused.code, refused.detail, headers)


def bad_request(detail: str, code: str = "invalid_request") -> HttpError:
    return HttpError(400, code, detail)


def body_too_large(limit: int) -> HttpError:
    return HttpError(413, "body_too_large", f"The request body is over the limit of {limit} bytes.")


async def read_raw_body(request: Request, required: bool = True) -> bytes:
    """The body, refused if too large (413) or not JSON (415), before anything is decided.
    (The middleware has refused a declared Content-Length over the limit; this counts what arrives.)"""
    limit = request.app.state.settings.max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        if required:
            raise bad_request("A JSON request body is required.")
        return b""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise HttpError(415, "unsupported_media_type", "The request body must be application/json.")
    return body


def decode_body(body: bytes, type_: type[T], max_depth: int, max_string: int) -> T:
    try:
        value = msgspec.json.decode(body, type=type_)
    except RecursionError:
        raise bad_request("The JSON body is nested too deeply.") from None
    except msgspec.ValidationError as exc:
        raise bad_request(f"Invalid request body: {exc}.") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets invalid UTF-8 through as the latter
        raise bad_request(f"Malformed JSON: {exc}.", "malformed_json") from None
    _check_shape(msgspec.to_builtins(value), max_depth, max_string, "$")
    return value


def _check_shape(value: Any, depth_left: int, max_string: int, path: str) -> None:
    """Bounds what a client can make us keep forever in the log."""
    if isinstance(value, str):
        if len(value) > max_string:
            raise bad_request(f"{path} is longer than {max_string} characters.")
        if "\x00" in value:
            raise bad_request(f"{path} contains a NUL character.")
        return
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > JSON_SAFE_INTEGER:
        raise bad_request(
            f"{path} is beyond ±(2^53 - 1); larger integers lose precision in JSON (send them as strings)."
        )
    if isinstance(value, float):
        raise bad_request(
            f"{path} is a fractional number; events hold integers, strings, booleans, null, arrays and "
            "objects only (send decimals as strings)."
        )
    if isinstance(value, (list, dict)):
        if depth_left <= 0:
            raise bad_request(f"{path} is nested too deeply.")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and (len(key) > max_string or "\x00" in key):
                raise bad_request(
                    f"A key in {path} is longer than {max_string} characters or contains a NUL character."
                )
            _check_shape(item, depth_left - 1, max_string, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]")


async def read_body(request: Request, type_: type[T], required: bool = True) -> tuple[bytes, T | None]:
    """The raw body (for Idempotency-Key fingerprints) and its value as `type_`; (b"", None) when
    an optional body is absent."""
    raw = await read_raw_body(request, required)
    if not raw:
        return raw, None
    settings = request.app.state.settings
    return raw, decode_body(raw, type_, settings.max_json_depth, settings.max_string_length)


def parse_uuid(value: str, what: str = "id") -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise bad_request(f"{what} {value[:80]!r} is not a valid UUID.", "invalid_uuid") from None


def whole_number(raw: str) -> int | None:
    """`raw` as a whole number SQLite can bind, or None. ASCII digits only: str.isdigit()
    also takes "²", which int() then refuses."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(MAX_INT)):
        return None
    value = int(raw)
    return value if value <= MAX_INT else None


def query_int(request: Request, name: str, default: int, minimum: int = 0, maximum: int = MAX_INT) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    value = whole_number(raw)
    if value is None or not minimum <= value <= maximum:
        raise bad_request(
            f"Query parameter {name} must be a whole number from {minimum} to {maximum}, not {raw[:40]!r}."
        )
    return value
