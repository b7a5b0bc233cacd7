"""The Starlette application: routes, error handling and the service's lifetime."""

from __future__ import annotations

import contextlib
import uuid

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from events import (
    IdempotencyConflict, InvalidEvent, LogClosed, Meta, WrongExpectedVersion, open_log,
)
from events import types as t
from projections import queries, store
from service.commands import Commands
from service.deciders import Rejected
from service.http import error_response
from service.middleware import ApiMiddleware
from service.routes import approvals, log as log_routes, registry, stream, tasks
from service.runner import ECHO_AGENT_ID, RUNNER_ACTOR, Runner
from service.settings import Settings

logger = structlog.get_logger("mission_control")


async def ensure_echo_agent(log) -> None:
    if await queries.agent(log, ECHO_AGENT_ID) is None:
        with contextlib.suppress(WrongExpectedVersion):
            await log.append(
                f"agent-{ECHO_AGENT_ID}",
                [t.AgentRegistered(agent_id=ECHO_AGENT_ID, name="echo", kind="echo")],
                expected=0, meta=Meta(actor=RUNNER_ACTOR),
            )


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    log = request.app.state.log
    figures = await queries.counters(log)
    head = await log.read_head()
    ready = request.app.state.ready and figures.checkpoint >= head
    body = {"ready": ready, "head": head, "projected": figures.checkpoint}
    return JSONResponse(body, 200 if ready else 503)


async def _rejected(request: Request, exc: Rejected) -> Response:
    return error_response(exc.status, exc.code, exc.detail, exc.headers)


async def _conflict(request: Request, exc: Exception) -> Response:
    code = "idempotency_conflict" if isinstance(exc, IdempotencyConflict) else "conflict"
    return error_response(409, code, f"{exc}; reload and try again." if code == "conflict" else str(exc))


async def _invalid_event(request: Request, exc: InvalidEvent) -> Response:
    return error_response(400, "invalid_request", f"The request would record an invalid event: {exc}.")


async def _closed(request: Request, exc: LogClosed) -> Response:
    return error_response(503, "shutting_down", "The service is shutting down.", {"Retry-After": "5"})


async def _http(request: Request, exc: HTTPException) -> Response:
    words = {404: "not_found", 405: "method_not_allowed"}
    detail = "No such route." if exc.status_code == 404 else str(exc.detail)
    return error_response(exc.status_code, words.get(exc.status_code, "http_error"), detail, exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", request_id=getattr(request.state, "request_id", None))
    return error_response(500, "internal_error", "Something went wrong on our side; it has been logged.")


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        log = open_log(str(settings.database), projector=store.project, durable=settings.durable)
        await log.open()
        app.state.log = log
        await store.prepare(log)
        await ensure_echo_agent(log)
        commands = Commands(log)
        runner = Runner(log, commands, settings)
        app.state.commands, app.state.runner = commands, runner
        await runner.recover()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await runner.close()
            await log.close()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *tasks.routes(), *approvals.routes(), *registry.routes(), *log_routes.routes(), *stream.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            Rejected: _rejected, WrongExpectedVersion: _conflict, IdempotencyConflict: _conflict,
            InvalidEvent: _invalid_event, LogClosed: _closed, HTTPException: _http, Exception: _server_error,
        },
    )
    app.state.settings = settings
    app.state.ready = False
    app.add_middleware(ApiMiddleware, state=app.state)
    return app
