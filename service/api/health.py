"""What the service answers at the root: liveness, readiness, this API's OpenAPI document, Prometheus
metrics, and the dashboard with its static files."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from events import StorageError
from projections.readmodels import ReadModels
from service.api import schemas
from service.http import openapi
from service.http.auth import Principal
from service.http.endpoints import endpoint
from service.http.metrics import Metrics

logger = structlog.get_logger("mission_control")
STATIC = Path(__file__).parent.parent / "static"


@endpoint(summary="The process is alive.", scope=None, answer=schemas.Health)
async def healthz(request: Request, who: Principal | None) -> Response:
    return JSONResponse({"status": "ok"})


@endpoint(summary="The log is open and the read models have caught up (503 until then).", scope=None,
          answer=schemas.Readiness, same_answer=(503,))
async def readyz(request: Request, who: Principal | None) -> Response:
    app = request.app.state
    try:
        figures = await request.state.models.counters()
        head = await request.state.log.read_head()
    except StorageError as exc:  # the database unreachable: not ready, whatever was folded before
        body = {"ready": False, "head": request.state.log.head, "projected": app.projected,
                "detail": f"The database cannot be reached: {exc}"}
        return JSONResponse(body, 503)
    app.projected = figures.checkpoint
    ready = app.ready and figures.checkpoint >= head
    if app.ready and not ready and (app.catching_up is None or app.catching_up.done()):
        # Events appended by a process without a projector are otherwise folded only by the
        # next append; an instance taken out of rotation for being unready would get none.
        app.catching_up = asyncio.create_task(_catch_up(request.state.models))
    body = {"ready": ready, "head": head, "projected": figures.checkpoint}
    return JSONResponse(body, 200 if ready else 503)


async def _catch_up(models: ReadModels) -> None:
    try:
        await models.refold()
    except Exception:
        logger.exception("catching the read models up with the log failed")


@endpoint(summary="This document.", scope=None, answer=dict[str, Any])
async def openapi_json(request: Request, who: Principal | None) -> Response:
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = msgspec.json.encode(openapi.build(request.app.routes))
    return Response(state.openapi, media_type="application/json")


@endpoint(summary="Prometheus metrics (public when MC_METRICS_PUBLIC=1).", scope="admin", public_if="metrics_public",
          media="text/plain")
async def metrics(request: Request, who: Principal | None) -> Response:
    figures: Metrics = request.app.state.metrics
    await figures.refresh(request.state.log, request.state.models, request.app.state.settings.max_concurrent)
    return Response(generate_latest(figures.registry), media_type=CONTENT_TYPE_LATEST)


@endpoint(summary="The dashboard: a web page to watch and steer tasks.", scope=None, media="text/html")
async def dashboard(request: Request, who: Principal | None) -> Response:
    return FileResponse(STATIC / "index.html")


def static_files() -> Mount:
    files = StaticFiles(directory=STATIC)
    files.__name__ = "static"  # the access log and metrics label requests by endpoint name
    return Mount("/static", files)


def routes() -> list[BaseRoute]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", dashboard, methods=["GET"]),
        static_files(),
    ]
