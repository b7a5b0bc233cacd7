"""Request bodies and query values: read within the limits, decoded into their msgspec types,
refused with a sentence saying what was wrong."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

from service.http.errors import HttpError, bad_request, body_too_large

T = TypeVar("T")

MAX_INT = 2**63 - 1
"""The largest integer SQLite binds; a larger query parameter would be a 500."""

JSON_SAFE_INTEGER = 2**53 - 1
"""Past it RFC 8785 writes an integer as a double, so an auditor's JCS bytes would differ."""


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
        _check_keys(body)
        hint = " (whole numbers are written as digits, without a fraction or an exponent)" if (
            "got `float`" in str(exc)) else ""
        raise bad_request(f"Invalid request body: {exc}{hint}.") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets invalid UTF-8 through as the latter
        raise bad_request(_malformed(body, exc), "malformed_json") from None
    try:  # the body as sent: every key and value the client wrote, none of the type's defaults
        sent = msgspec.json.decode(body)
    except msgspec.ValidationError as exc:
        raise bad_request(f"Invalid request body: {exc}.") from None
    counted = [0, 0]  # an object's key-value pairs, the colons inside strings
    _check_shape(sent, max_depth, max_string, "$", counted)
    # Every ':' of a JSON text separates a pair or sits in a string, and a pair lost to a repeated
    # key takes its ':' with it: so, unless a string spells one as an escape, the count tells
    # whether a key repeats, and the costly pair-by-pair check runs only when it may.
    if body.count(b":") != counted[0] + counted[1] or b"\\u003" in body:
        _check_keys(body)
    return value


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return value


def _check_keys(body: bytes) -> None:
    """Refuses a key given twice in one object. msgspec keeps the last silently, while a proxy or
    an auditor reading first-wins would see another request; only the standard library's parser
    hands over an object's pairs before they become a dict (a few microseconds for a usual body)."""
    try:
        json.loads(body, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as exc:
        raise bad_request(
            f"The key {str(exc.args[0])[:80]!r} appears more than once in one object; each key may appear once."
        ) from None
    except (ValueError, RecursionError):  # what msgspec took and this parser cannot: refused by the shape check
        pass


ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.S)
"""A JSON string escape; `\\\\` is consumed whole, so the `u` after it starts no escape."""


def _lone_surrogate(text: str) -> str | None:
    """The first `\\uXXXX` escape of a UTF-16 surrogate that has no partner, if any."""
    high: re.Match | None = None
    for escape in ESCAPE.finditer(text):
        code = int(escape.group(1), 16) if escape.group(1) else -1
        if high is not None:
            if 0xDC00 <= code <= 0xDFFF and escape.start() == high.end():
                high = None
                continue
            return high.group()
        if 0xD800 <= code <= 0xDBFF:
            high = escape
        elif 0xDC00 <= code <= 0xDFFF:
            return escape.group()
    return high.group() if high is not None else None


def _malformed(body: bytes, exc: Exception) -> str:
    # msgspec calls a lone surrogate "truncated" or "invalid utf-16 surrogate pair": say what it is.
    if isinstance(exc, msgspec.DecodeError) and (lone := _lone_surrogate(body.decode("utf-8", "replace"))):
        return (f"Malformed JSON: {lone} is a lone UTF-16 surrogate, which is no character; a character "
                "beyond U+FFFF is escaped as a high surrogate followed by a low one.")
    return f"Malformed JSON: {exc}."


def _check_shape(value: Any, depth_left: int, max_string: int, path: str, counted: list[int]) -> None:
    """Bounds what a client can make us keep forever in the log; counts pairs and colons in strings
    into `counted` for the duplicate-key check."""
    if isinstance(value, str):
        if len(value) > max_string:
            raise bad_request(f"{path} is longer than {max_string} characters.")
        if "\x00" in value:
            raise bad_request(f"{path} contains a NUL character.")
        counted[1] += value.count(":")
        return
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > JSON_SAFE_INTEGER:
        raise bad_request(
            f"{path} is beyond ±(2^53 - 1); larger integers lose precision in JSON (send them as strings)."
        )
    if isinstance(value, float):  # from a fraction (1.5, 1.0) or an exponent (1E2): which, msgspec does not say
        raise bad_request(
            f"{path} is a number with a fraction or an exponent; events hold integers written as plain digits, "
            "strings, booleans, null, arrays and objects only (send decimals as strings)."
        )
    if isinstance(value, list):
        if depth_left <= 0:
            raise bad_request(f"{path} is nested too deeply.")
        for index, item in enumerate(value):
            _check_shape(item, depth_left - 1, max_string, f"{path}[{index}]", counted)
    elif isinstance(value, dict):
        if depth_left <= 0:
            raise bad_request(f"{path} is nested too deeply.")
        counted[0] += len(value)
        for key, item in value.items():
            if len(key) > max_string or "\x00" in key:
                raise bad_request(
                    f"A key in {path} is longer than {max_string} characters or contains a NUL character."
                )
            counted[1] += key.count(":")
            _check_shape(item, depth_left - 1, max_string, f"{path}.{key}", counted)


async def read_body(request: Request, type_: type[T], required: bool = True) -> tuple[bytes, T | None]:
    """The raw body (for Idempotency-Key fingerprints) and its value as `type_`; (b"", None) when
    an optional body is absent."""
    raw = await read_raw_body(request, required)
    if not raw:
        return raw, None
    settings = request.app.state.settings
    return raw, decode_body(raw, type_, settings.max_json_depth, settings.max_string_length)


CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""A UUID as the API writes one: what nearly every path names, so it skips building a UUID."""


def parse_uuid(value: str, what: str = "id") -> str:
    """`value` in the API's form (lowercase, hyphenated); the other forms `uuid.UUID` reads, written so."""
    if CANONICAL_UUID.fullmatch(value):
        return value
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
    if raw is None:  # an empty value is refused for every parameter by the middleware
        return default
    value = whole_number(raw)
    if value is None or not minimum <= value <= maximum:
        raise bad_request(
            f"Query parameter {name} must be a whole number from {minimum} to {maximum}, not {raw[:40]!r}."
        )
    return value
