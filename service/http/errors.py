"""Errors as API.md shapes them, `{"detail": ..., "code": ...}`: an HTTP-level refusal
(`HttpError`), or a domain `Refused` given its status by one table (REFUSALS)."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

from service.commands.deciders import Code, OutputGap, Refused
from service.work.wire import Gap

_encoder = msgspec.json.Encoder()


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
    "conflict": 409, "idempotency_conflict": 409,
    "lease_lost": 409, "output_gap": 409, "not_registered": 409, "budget_exceeded": 409, "artifact_missing": 409,
    "precondition_failed": 412,
    "concurrency_limit": 429, "desktop_full": 429,
    "agent_unavailable": 503, "desktop_unavailable": 503,
}
"""The HTTP status of each domain refusal; one that says when to retry also sends Retry-After."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(body), status, headers, media_type="application/json")


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(Error(detail=detail, code=code), status, headers)


def refusal_response(refused: Refused) -> Response:
    if isinstance(refused, OutputGap):  # the worker resends from expectedSeq
        return json_response(Gap(detail=refused.detail, expected_seq=refused.expected_seq), REFUSALS[refused.code])
    headers = None if refused.retry_after is None else {"Retry-After": str(refused.retry_after)}
    return error_response(REFUSALS[refused.code], refused.code, refused.detail, headers)


def bad_request(detail: str, code: str = "invalid_request") -> HttpError:
    return HttpError(400, code, detail)


def body_too_large(limit: int) -> HttpError:
    return HttpError(413, "body_too_large", f"The request body is over the limit of {limit} bytes.")


def storage_unavailable() -> HttpError:
    """The log's storage failed (PostgreSQL restarting, unreachable): nothing of the request was
    acknowledged, and the log reconnects by itself, so the client may send it again shortly."""
    return HttpError(
        503, "storage_unavailable", "The service cannot reach its database just now; try again shortly.",
        {"Retry-After": "1"},
    )
