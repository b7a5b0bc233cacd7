"""The Starlette application: routes, error handling and the service's lifetime."""

from __future__ import annotations

import contextlib

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Mount, Route

from events import IdempotencyConflict, InvalidEvent, LogClosed, StorageError, WrongExpectedVersion, open_log
from projections.readmodels import read_models
from service.api import (
    API_PREFIX, agents, approvals, artifacts, desktops, devices, health, log as log_routes, overview, projects, stream,
    tasks, worker,
)
from service.artifacts import open_store
from service.commands.deciders import Refused
from service.commands.handling import Commands
from service.http import auth
from service.http.errors import HttpError, error_response, refusal_response, storage_unavailable
from service.http.endpoints import walk
from service.http.metrics import Metrics
from service.http.middleware import ApiMiddleware
from service.settings import Settings
from service.work import local
from service.work.dispatch import Dispatcher
from service.work.leases import Keeper, open_leases
from service.work.reports import Reports
from service.work.notifications import Notifier
from service.work.webhooks import WebhookWorker

logger = structlog.get_logger("mission_control")


async def _http_error(request: Request, exc: HttpError) -> Response:
    return error_response(exc.status, exc.code, exc.detail, exc.headers)


async def _refused(request: Request, exc: Refused) -> Response:
    return refusal_response(exc)


async def _conflict(request: Request, exc: Exception) -> Response:
    code = "idempotency_conflict" if isinstance(exc, IdempotencyConflict) else "conflict"
    return refusal_response(Refused(code, f"{exc}; reload and try again." if code == "conflict" else str(exc)))


async def _invalid_event(request: Request, exc: InvalidEvent) -> Response:
    return error_response(400, "invalid_request", f"The request would record an invalid event: {exc}.")


async def _closed(request: Request, exc: LogClosed) -> Response:
    return error_response(503, "shutting_down", "The service is shutting down.", {"Retry-After": "5"})


async def _storage_failed(request: Request, exc: StorageError) -> Response:
    logger.warning("the log's storage failed; answered 503", error=str(exc),
                   request_id=getattr(request.state, "request_id", None))
    return await _http_error(request, storage_unavailable())


async def _http(request: Request, exc: HTTPException) -> Response:
    words = {404: "not_found", 405: "method_not_allowed"}
    detail = "No such route." if exc.status_code == 404 else str(exc.detail)
    headers = exc.headers
    if exc.status_code == 405:  # Starlette names the first route on the path only; each method has its own
        headers = {**(headers or {}), "Allow": ", ".join(sorted(_methods_on(request)))}
    return error_response(exc.status_code, words.get(exc.status_code, "http_error"), detail, headers)


def _methods_on(request: Request) -> set[str]:
    # Matched against the path as the app received it: a Mount's routes by their full paths.
    scope = {**request.scope, "root_path": request.scope.get("app_root_path", "")}
    return {
        method for path, route in walk(request.app.router.routes) if route.methods
        and Route(path, route.endpoint, methods=list(route.methods)).matches(scope)[0] != Match.NONE
        for method in route.methods
    }


async def _disconnected(request: Request, exc: ClientDisconnect) -> Response:
    # The client left while sending its body: nobody reads this answer, and it is no server error.
    return Response(status_code=499)


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", request_id=getattr(request.state, "request_id", None))
    return error_response(500, "internal_error", "Something went wrong on our side; it has been logged.")


def create_app(settings: Settings, *, webhooks: bool = True) -> Starlette:
    """The app on `settings`; `webhooks=False` for a process that leaves sending webhooks and
    notifications to another process on the same log (`serve --processes`): each would send every
    delivery."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        log = open_log(settings.log_url, durable=settings.durable)
        models = read_models(log)
        await log.open()
        metrics.attach(log)
        await models.prepare()
        await local.ensure_echo_agent(log, models)
        commands = Commands(log, models)
        keys = auth.Keys(log, models)
        keys.start()
        await local.recover(models, commands, settings)  # before this node's desktop starts a new session
        leases = open_leases(log)  # shared by every node on the log's database
        await leases.prepare()
        store = open_store(log)  # beside the log: every node on it serves every artifact
        await store.prepare()
        reports = Reports(log, models, commands, leases, settings, artifacts=store)
        reports.start()
        desktop = None if settings.no_local_desktop else local.LocalDesktop(reports, models, commands, settings)
        if desktop is not None:
            await desktop.start()
        keeper = Keeper(log, models, commands, leases, settings.lease_seconds)
        await keeper.start()
        senders = [WebhookWorker(log, models, settings), Notifier(log, models, settings)] if webhooks else []
        for sender in senders:
            sender.start()
        dispatcher = Dispatcher(log, models, commands, settings.max_concurrent)
        await dispatcher.start()
        app.state.ready = True
        try:
            yield {  # request.state.*
                "log": log, "models": models, "commands": commands, "reports": reports, "local": desktop,
                "dispatcher": dispatcher, "keys": keys, "artifacts": store,
            }
        finally:
            app.state.ready = False
            if app.state.catching_up is not None:
                app.state.catching_up.cancel()
            await dispatcher.close()
            if desktop is not None:
                await desktop.close()
            await keeper.close()
            await reports.close()
            for sender in senders:
                await sender.close()
            await leases.close()
            await keys.close()
            await store.close()
            await log.close()

    metrics = Metrics()
    api = [
        *tasks.routes(), *approvals.routes(), *agents.routes(), *projects.routes(), *log_routes.routes(),
        *overview.routes(), *desktops.routes(), *devices.routes(), *worker.routes(), *artifacts.routes(),
        *metrics.counting(stream.routes()),
    ]
    app = Starlette(
        routes=[Mount(API_PREFIX, routes=api), *health.routes()],
        lifespan=lifespan,
        exception_handlers={
            HttpError: _http_error, Refused: _refused, WrongExpectedVersion: _conflict, IdempotencyConflict: _conflict,
            InvalidEvent: _invalid_event, LogClosed: _closed, StorageError: _storage_failed, HTTPException: _http,
            ClientDisconnect: _disconnected, Exception: _server_error,
        },
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.catching_up = None
    app.state.projected = 0  # the read models' checkpoint as /readyz last read it
    app.state.metrics = metrics
    app.add_middleware(ApiMiddleware, state=app.state)
    return app
