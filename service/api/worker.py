"""/worker: a desktop's worker registers, polls for work and reports on its runs.

Only parsing and authentication live here: every route hands the key's desktop (never one the
worker names) and the decoded wire message to `request.state.reports`
(service/work/reports.py), which the node's own desktop calls directly.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.api import schemas
from service.api.desktops import desktop_view
from service.commands.deciders import Refused
from service.http.auth import WORKER, Principal
from service.http.bodies import parse_uuid
from service.http.errors import bad_request, json_response
from service.http.endpoints import IDEMPOTENCY, LEASE, declared_body, endpoint
from service.work import wire
from service.work.reports import WorkerIdentity


def _identity(who: Principal) -> WorkerIdentity:
    return WorkerIdentity(desktop_id=who.desktop_id, key_id=who.key_id)


def _run(request: Request) -> tuple[str, str]:
    """The run in the path and the lease the report is made under (`MC-Lease`, for that run)."""
    run_id = parse_uuid(request.path_params["run_id"], "Run id")
    lease = request.headers.get("mc-lease")
    if lease is None:
        raise bad_request("A report on a run needs its lease: send MC-Lease: <runId>:<epoch> from its assignment.")
    parsed = wire.parse_lease(lease.strip())
    if parsed is None:
        raise bad_request(f"MC-Lease {lease[:80]!r} is no lease: it is <runId>:<epoch>, as the assignment gave it.")
    if parsed[0] != run_id:
        raise bad_request(f"MC-Lease is the lease of run {parsed[0][:40]}, not of run {run_id}.")
    return run_id, lease.strip()


async def _desktop(request: Request, desktop) -> schemas.DesktopOut:
    return await desktop_view(request, desktop, None)  # a worker is shown every run it has been given


@endpoint(
    summary="A worker (re)registers as its key's desktop and learns its intervals.", scope=WORKER,
    body=wire.Register, answer=wire.Registered, errors=(404, 409),
)
async def register(request: Request, who: Principal) -> Response:
    _, body = await declared_body(request)
    if body.desktop_id is not None and body.desktop_id != who.desktop_id:
        raise Refused("not_found", f"This key is for desktop {who.desktop_id}, not {body.desktop_id}.")
    registered = await request.state.reports.register(_identity(who), body)
    desktop = await request.state.models.desktop(who.desktop_id)
    return json_response(msgspec.structs.replace(registered, desktop=await _desktop(request, desktop)))


@endpoint(
    summary="A worker checks in: renews its runs' leases and is answered what is due, or nothing after "
            "pollSeconds.", scope=WORKER, body=wire.Poll, answer=wire.PollAnswer, errors=(409,),
)
async def poll(request: Request, who: Principal) -> Response:
    _, body = await declared_body(request)
    return json_response(await request.state.reports.poll(_identity(who), body))


@endpoint(
    summary="A run's output, numbered chunks in order; a resend records only what is new (409 output_gap, "
            "with expectedSeq, when some is missing).", scope=WORKER, body=wire.OutputBatch,
    answer=wire.OutputAck, params=(LEASE,), errors=(409,),
)
async def output(request: Request, who: Principal) -> Response:
    run_id, lease = _run(request)
    _, body = await declared_body(request)
    return json_response(await request.state.reports.output(_identity(who), run_id, lease, body))


@endpoint(
    summary="The run's agent asks a question; its answer comes back as a poll's message.", scope=WORKER,
    body=wire.Ask, answer=wire.RunStatus, params=(LEASE,), errors=(409,),
)
async def ask(request: Request, who: Principal) -> Response:
    run_id, lease = _run(request)
    _, body = await declared_body(request)
    return json_response(await request.state.reports.ask(_identity(who), run_id, lease, body))


@endpoint(
    summary="How the run ended, with its last output; a resend under the same Idempotency-Key (default "
            "`end-<runId>`) answers the same and records nothing.", scope=WORKER, body=wire.Ending,
    answer=wire.RunStatus, params=(LEASE, IDEMPOTENCY), errors=(409,),
)
async def finish(request: Request, who: Principal) -> Response:
    run_id, lease = _run(request)
    key = request.headers.get("idempotency-key", f"end-{run_id}")
    if not 1 <= len(key) <= 200:
        raise bad_request("Idempotency-Key must be 1 to 200 characters.")
    _, body = await declared_body(request)
    return json_response(await request.state.reports.finish(_identity(who), run_id, lease, body, key))


@endpoint(
    summary="The worker drains its desktop (its SIGTERM): it takes nothing new and finishes what it has.",
    scope=WORKER, body=schemas.Body, body_required=False, answer=schemas.DesktopAnswer, errors=(404, 409),
)
async def drain(request: Request, who: Principal) -> Response:
    await declared_body(request)  # none, or `{}`: never ignored garbage
    desktop = await request.state.reports.drain(_identity(who))
    return json_response(schemas.DesktopAnswer(desktop=await _desktop(request, desktop)))


@endpoint(
    summary="The worker leaves: its desktop goes offline.", scope=WORKER, body=schemas.Body, body_required=False,
    status=204, errors=(404, 409),
)
async def leave(request: Request, who: Principal) -> Response:
    await declared_body(request)
    await request.state.reports.leave(_identity(who))
    return Response(status_code=204)


def routes() -> list[Route]:
    return [
        Route("/worker/register", register, methods=["POST"]),
        Route("/worker/poll", poll, methods=["POST"]),
        Route("/worker/runs/{run_id}/output", output, methods=["POST"]),
        Route("/worker/runs/{run_id}/ask", ask, methods=["POST"]),
        Route("/worker/runs/{run_id}/finish", finish, methods=["POST"]),
        Route("/worker/drain", drain, methods=["POST"]),
        Route("/worker/leave", leave, methods=["POST"]),
    ]
