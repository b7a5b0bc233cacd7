"""/projects: the contexts tasks share, and who is a member."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from events import streams
from events import types as t
from projections import projects
from projections.projects import Project
from service.api import API_PREFIX, schemas
from service.api.schemas import sent_fields
from service.commands.deciders import Refused
from service.commands.requests import record
from service.http.auth import Principal, sees_project, visible_projects
from service.http.bodies import parse_uuid
from service.http.errors import json_response
from service.http.endpoints import IDEMPOTENCY, declared_body, endpoint
from service.ids import new_id


async def _project(request: Request, who: Principal) -> Project:
    project_id = parse_uuid(request.path_params["project_id"], "Project id")
    project = await request.state.models.project(project_id)
    if project is None or not sees_project(who, project):
        raise Refused("not_found", "Project not found.")
    return project


@endpoint(
    summary="Projects the caller belongs to.", scope="task:read", answer=list[Project],
)
async def list_projects(request: Request, who: Principal) -> Response:
    allowed = await visible_projects(request.state.models, who)
    found = [p for p in await request.state.models.projects() if allowed is None or p.id in allowed]
    return json_response(found)


@endpoint(
    summary="A project.", scope="task:read", answer=Project,
)
async def get_project(request: Request, who: Principal) -> Response:
    return json_response(await _project(request, who))


@endpoint(
    summary="Create a project.", scope="admin", body=schemas.CreateProject, status=201, answer=Project,
    headers=("Location",), params=(IDEMPOTENCY,), errors=(409,),
)
async def create_project(request: Request, who: Principal) -> Response:
    raw, body = await declared_body(request)
    project_id = new_id()
    event = t.ProjectCreated(project_id=project_id, name=body.name, context=body.context, members=body.members)
    project = await record(request, who, streams.project(project_id), [event], 0, raw, projects.evolve)
    return json_response(project, 201, {"Location": f"{API_PREFIX}/projects/{project.id}"})


@endpoint(
    summary="Change a project.", scope="admin", body=schemas.UpdateProject, answer=Project,
    params=(IDEMPOTENCY,), errors=(409,),
)
async def update_project(request: Request, who: Principal) -> Response:
    project = await _project(request, who)
    raw, body = await declared_body(request)
    event = t.ProjectUpdated(project_id=project.id, **sent_fields(body))
    return json_response(
        await record(request, who, streams.project(project.id), [event], project.version, raw, projects.evolve)
    )


def routes() -> list[Route]:
    return [
        Route("/projects", list_projects, methods=["GET"]),
        Route("/projects", create_project, methods=["POST"]),
        Route("/projects/{project_id}", get_project, methods=["GET"]),
        Route("/projects/{project_id}", update_project, methods=["PATCH"]),
    ]
