"""/desktops: the machines that run the work, as people see them; an admin drains, resumes and
removes them. (A desktop's own worker speaks service/api/worker.py.)"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from events import rfc3339
from projections.desktops import Desktop
from service.api import schemas
from service.commands.deciders import Refused
from service.commands.desktops import Drain, Remove, Resume
from service.commands.requests import meta
from service.http.auth import Principal, is_desktop_name, visible_projects
from service.http.errors import bad_request, json_response
from service.http.endpoints import declared_body, endpoint


async def desktop_view(request: Request, desktop: Desktop, allowed: list[str] | None) -> schemas.DesktopOut:
    """The desktop as served: `busy` counts every run placed on it, `running` lists the runs of
    the projects in `allowed` (None: every project)."""
    runs = await request.state.models.active_runs(desktop.id)
    heard = await request.state.reports.leases.last_heard(desktop.id)
    return schemas.DesktopOut(
        id=desktop.id, status=desktop.status, agents=desktop.agents, capacity=desktop.capacity, busy=len(runs),
        running=[task.run_id for task in runs if allowed is None or task.project_id in allowed],
        last_seen_at=desktop.changed_at if heard is None else rfc3339(heard), version=desktop.version,
    )


async def _desktop(request: Request) -> Desktop:
    desktop_id = request.path_params["desktop_id"]
    if not is_desktop_name(desktop_id):
        raise bad_request(f"Desktop id {desktop_id[:80]!r} is no desktop's name: 1 to 63 of a-z, 0-9, '.', '_' "
                          "and '-', starting with a letter or a digit.")
    desktop = await request.state.models.desktop(desktop_id)
    if desktop is None:
        raise Refused("not_found", f"Desktop {desktop_id} not found.")
    return desktop


@endpoint(summary="Desktops, by name.", scope="task:read", answer=list[schemas.DesktopOut])
async def list_desktops(request: Request, who: Principal) -> Response:
    allowed = await visible_projects(request.state.models, who)
    return json_response([await desktop_view(request, d, allowed) for d in await request.state.models.desktops()])


async def _answer(request: Request, who: Principal, desktop: Desktop) -> Response:
    return json_response(await desktop_view(request, desktop, await visible_projects(request.state.models, who)))


@endpoint(summary="A desktop.", scope="task:read", answer=schemas.DesktopOut)
async def get_desktop(request: Request, who: Principal) -> Response:
    return await _answer(request, who, await _desktop(request))


async def _command(request: Request, who: Principal, command) -> Desktop | None:
    """The desktop after the command; a command that changes nothing (a second drain) records nothing."""
    desktop = await _desktop(request)
    await declared_body(request)  # none, or `{}`: never ignored garbage
    changed, _ = await request.state.commands.desktop(desktop.id, command, meta(request, who))
    return changed


@endpoint(
    summary="Drain a desktop: it takes no new runs and finishes those it has (idempotent).", scope="admin",
    body=schemas.Body, body_required=False, answer=schemas.DesktopOut, errors=(409,),
)
async def drain_desktop(request: Request, who: Principal) -> Response:
    return await _answer(request, who, await _command(request, who, Drain(by="admin")))


@endpoint(
    summary="Resume a drained desktop (idempotent).", scope="admin", body=schemas.Body, body_required=False,
    answer=schemas.DesktopOut, errors=(409,),
)
async def resume_desktop(request: Request, who: Principal) -> Response:
    return await _answer(request, who, await _command(request, who, Resume()))


@endpoint(
    summary="Forget an offline desktop (409 while it is online or draining).", scope="admin", status=204,
    body=schemas.Body, body_required=False, errors=(409,),
)
async def remove_desktop(request: Request, who: Principal) -> Response:
    await _command(request, who, Remove())
    return Response(status_code=204)


def routes() -> list[Route]:
    return [
        Route("/desktops", list_desktops, methods=["GET"]),
        Route("/desktops/{desktop_id}", get_desktop, methods=["GET"]),
        Route("/desktops/{desktop_id}", remove_desktop, methods=["DELETE"]),
        Route("/desktops/{desktop_id}/drain", drain_desktop, methods=["POST"]),
        Route("/desktops/{desktop_id}/resume", resume_desktop, methods=["POST"]),
    ]
