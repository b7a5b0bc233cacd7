"""/overview: the dashboard's figures: counts, the machine's resources and the log's head."""

from __future__ import annotations

import psutil
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.api import schemas
from service.http.auth import Principal, visible_projects
from service.http.errors import json_response
from service.http.endpoints import endpoint


@endpoint(
    summary="Counts, resources, the log's head and the usage of the runs the caller may see.", scope="task:read", answer=schemas.Overview,
)
async def overview(request: Request, who: Principal) -> Response:
    log = request.state.log
    models = request.state.models
    figures = await models.counters()
    memory = psutil.virtual_memory()
    return json_response(schemas.Overview(
        tasks=figures.tasks,
        active_desktops=figures.active_desktops,
        active_agents=figures.active_agents,
        approvals_pending=figures.approvals_pending,
        max_concurrent=request.app.state.settings.max_concurrent,
        resources=schemas.Resources(
            cpu=psutil.cpu_percent(interval=None),
            memory=schemas.Memory(
                used=(memory.total - memory.available) // 2**20, total=memory.total // 2**20,
                percent=memory.percent,
            ),
        ),
        log=schemas.LogFigures(head=await log.read_head(), streams=figures.streams),  # the CLI's appends too
        usage=await models.usage(project_ids=await visible_projects(models, who)),
    ))


def routes() -> list[Route]:
    return [Route("/overview", overview, methods=["GET"])]
