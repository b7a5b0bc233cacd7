"""What a request that acts appends under: its meta (who, which request), and its Idempotency-Key
with the fingerprint of the request that carried it."""

from __future__ import annotations

import hashlib

import msgspec
from starlette.requests import Request

from events import Meta, canonical_json, typed
from service.commands.handling import Idempotency
from service.http.auth import Principal
from service.http.errors import bad_request


def meta(request: Request, who: Principal) -> Meta:
    return Meta(actor=who.user, request_id=request.state.request_id)


def _same_json(body: bytes) -> bytes:
    """The body in canonical form, so a client's whitespace or key order is not "another body"."""
    try:
        return canonical_json(msgspec.json.decode(body)) if body else b""
    except (msgspec.DecodeError, RecursionError):
        return body


def idempotency(request: Request, who: Principal, body: bytes) -> Idempotency | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200:
        raise bad_request("Idempotency-Key must be 1 to 200 characters.")
    fingerprint = hashlib.sha256(f"{request.method} {request.url.path}\0".encode() + _same_json(body)).hexdigest()
    return Idempotency(f"{who.user}\0{key}", fingerprint)


async def record(request: Request, who: Principal, stream: str, events: list, expected: int, raw: bytes, evolve):
    """Append and fold the stream to that point. A key used before makes the log return what it
    appended then (keys are checked before versions), or refuse a different request (409)."""
    recorded = await request.state.commands.append(stream, events, expected, meta(request, who), idempotency(request, who, raw))
    state = None
    # A replayed create recorded into the stream of the id it made then, not the fresh id made now.
    for event in await request.state.log.read_stream(recorded[-1].stream, until_position=recorded[-1].position):
        state = evolve(state, typed(event))
    return state
