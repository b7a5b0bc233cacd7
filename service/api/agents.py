"""/agents and /projects: the registry of executors, and the contexts tasks share."""

from __future__ import annotations

import uuid

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from events import typed
from events import streams
from events import types as t
from projections import agents, projects
from projections.agents import AGENT_KINDS, Agent
from projections.projects import Project
from service.api import schemas
from service.work.agents.kinds import check_config
from service.http.auth import Principal, visible_projects
from service.api.tenancy import commands_of, idempotency, log_of, meta, models_of, principal
from service.commands.deciders import Refused
from service.http.bodies import API_PREFIX, bad_request, json_response, parse_uuid, read_body


def _changes(body: msgspec.Struct) -> dict:
    return {f: getattr(body, f) for f in body.__struct_fields__ if getattr(body, f) is not msgspec.UNSET}


async def _record(request: Request, who: Principal, stream: str, events: list, expected: int, raw: bytes, evolve):
    """Append and fold the stream to that point. A key used before makes the log return what it
    appended then (keys are checked before versions), or refuse a different request (409)."""
    recorded = await commands_of(request).append(stream, events, expected, meta(request, who), idempotency(request, who, raw))
    state = None
    # A replayed create recorded into the stream of the id it made then, not the fresh id made now.
    for event in await log_of(request).read_stream(recorded[-1].stream, until_position=recorded[-1].position):
        state = evolve(state, typed(event))
    return state


# --- agents ----------------------------------------------------------------------


def _admin_only(who: Principal, kind: str) -> None:
    if AGENT_KINDS[kind].admin_only and not who.has("admin"):
        raise Refused("forbidden", f"Only an admin key may register or change a {kind} agent.")


def _check_config(kind: str, config: dict | msgspec.UnsetType) -> None:
    """A config the agent's kind cannot run with is refused now, not at its first run."""
    if config is not msgspec.UNSET:
        try:
            check_config(kind, config)
        except ValueError as exc:
            raise bad_request(str(exc)) from None


async def _agent(request: Request) -> Agent:
    agent_id = parse_uuid(request.path_params["agent_id"], "Agent id")
    agent = await models_of(request).agent(agent_id)
    if agent is None:
        raise Refused("not_found", "Agent not found.")
    return agent


async def list_agents(request: Request) -> Response:
    principal(request, "task:read")
    return json_response(await models_of(request).agents())


async def get_agent(request: Request) -> Response:
    principal(request, "task:read")
    return json_response(await _agent(request))


# Agent routes check the scope before reading the path or the body: a key without it learns nothing.


async def create_agent(request: Request) -> Response:
    who = principal(request, "agent:write")
    raw, body = await read_body(request, schemas.CreateAgent)
    _admin_only(who, body.kind)
    _check_config(body.kind, body.config)
    agent_id = str(uuid.uuid4())
    event = t.AgentRegistered(agent_id=agent_id, name=body.name, kind=body.kind, config=body.config)
    agent = await _record(request, who, streams.agent(agent_id), [event], 0, raw, agents.evolve)
    return json_response(agent, 201, {"Location": f"{API_PREFIX}/agents/{agent.id}"})


async def update_agent(request: Request) -> Response:
    who = principal(request, "agent:write")
    agent = await _agent(request)
    _admin_only(who, agent.kind)
    raw, body = await read_body(request, schemas.UpdateAgent)
    _check_config(agent.kind, body.config)
    return await _agent_event(request, who, agent, t.AgentUpdated(agent_id=agent.id, **_changes(body)), raw)


async def _agent_event(request, who, agent: Agent, event, raw: bytes) -> Response:
    return json_response(await _record(request, who, streams.agent(agent.id), [event], agent.version, raw, agents.evolve))


async def pause_agent(request: Request) -> Response:
    return await _set_status(request, t.AgentPaused)


async def resume_agent(request: Request) -> Response:
    return await _set_status(request, t.AgentResumed)


async def _set_status(request: Request, event_type) -> Response:
    who = principal(request, "agent:write")
    agent = await _agent(request)
    _admin_only(who, agent.kind)
    raw, _ = await read_body(request, schemas.Body, required=False)  # none, or `{}`: never ignored garbage
    return await _agent_event(request, who, agent, event_type(agent_id=agent.id), raw)


# --- projects --------------------------------------------------------------------


async def _project(request: Request, who: Principal) -> Project:
    project_id = parse_uuid(request.path_params["project_id"], "Project id")
    project = await models_of(request).project(project_id)
    allowed = await visible_projects(models_of(request), who)
    if project is None or (allowed is not None and project_id not in allowed):
        raise Refused("not_found", "Project not found.")
    return project


async def list_projects(request: Request) -> Response:
    who = principal(request, "task:read")
    allowed = await visible_projects(models_of(request), who)
    found = [p for p in await models_of(request).projects() if allowed is None or p.id in allowed]
    return json_response(found)


async def get_project(request: Request) -> Response:
    who = principal(request, "task:read")
    return json_response(await _project(request, who))


async def create_project(request: Request) -> Response:
    who = principal(request, "admin")
    raw, body = await read_body(request, schemas.CreateProject)
    project_id = str(uuid.uuid4())
    event = t.ProjectCreated(project_id=project_id, name=body.name, context=body.context, members=body.members)
    project = await _record(request, who, streams.project(project_id), [event], 0, raw, projects.evolve)
    return json_response(project, 201, {"Location": f"{API_PREFIX}/projects/{project.id}"})


async def update_project(request: Request) -> Response:
    who = principal(request, "admin")
    project = await _project(request, who)
    raw, body = await read_body(request, schemas.UpdateProject)
    event = t.ProjectUpdated(project_id=project.id, **_changes(body))
    return json_response(
        await _record(request, who, streams.project(project.id), [event], project.version, raw, projects.evolve)
    )


def routes() -> list[Route]:
    a, p = f"{API_PREFIX}/agents", f"{API_PREFIX}/projects"
    return [
        Route(a, list_agents, methods=["GET"]),
        Route(a, create_agent, methods=["POST"]),
        Route(a + "/{agent_id}", get_agent, methods=["GET"]),
        Route(a + "/{agent_id}", update_agent, methods=["PATCH"]),
        Route(a + "/{agent_id}/pause", pause_agent, methods=["POST"]),
        Route(a + "/{agent_id}/resume", resume_agent, methods=["POST"]),
        Route(p, list_projects, methods=["GET"]),
        Route(p, create_project, methods=["POST"]),
        Route(p + "/{project_id}", get_project, methods=["GET"]),
        Route(p + "/{project_id}", update_project, methods=["PATCH"]),
    ]
