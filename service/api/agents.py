"""/agents: the registry of executors."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from events import streams
from events import types as t
from projections import agents
from projections.agents import AGENT_KINDS, Agent
from projections.usage import Usage
from service.api import API_PREFIX, schemas
from service.api.schemas import sent_fields
from service.commands.deciders import Refused
from service.commands.requests import record
from service.http.auth import Principal, visible_projects
from service.http.bodies import parse_uuid
from service.http.errors import bad_request, json_response
from service.http.endpoints import IDEMPOTENCY, declared_body, endpoint
from service.ids import new_id
from service.work.agents.kinds import check_config


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
    agent = await request.state.models.agent(agent_id)
    if agent is None:
        raise Refused("not_found", "Agent not found.")
    return agent


async def _with_usage(request: Request, who: Principal, found: list[Agent]) -> list[Agent]:
    """The agents, each with its usage over the runs the caller may see: its projects' tasks."""
    models = request.state.models
    projects = await visible_projects(models, who)
    spent = await models.usage_by_agent(projects)
    for agent in found:
        agent.usage = spent.get(agent.id, Usage())
    return found


@endpoint(
    summary="Agents, each with its usage over the caller's projects.", scope="task:read", answer=list[Agent],
)
async def list_agents(request: Request, who: Principal) -> Response:
    return json_response(await _with_usage(request, who, await request.state.models.agents()))


@endpoint(
    summary="An agent, with its usage over the caller's projects.", scope="task:read", answer=Agent,
)
async def get_agent(request: Request, who: Principal) -> Response:
    return json_response((await _with_usage(request, who, [await _agent(request)]))[0])


# Agent routes check the scope before reading the path or the body: a key without it learns nothing.


@endpoint(
    summary="Register an agent (a shell agent: admin only).", scope="agent:write", body=schemas.CreateAgent,
    status=201, answer=Agent, headers=("Location",), params=(IDEMPOTENCY,), errors=(409,),
)
async def create_agent(request: Request, who: Principal) -> Response:
    raw, body = await declared_body(request)
    _admin_only(who, body.kind)
    _check_config(body.kind, body.config)
    agent_id = new_id()
    event = t.AgentRegistered(agent_id=agent_id, name=body.name, kind=body.kind, config=body.config)
    agent = await record(request, who, streams.agent(agent_id), [event], 0, raw, agents.evolve)
    return json_response(agent, 201, {"Location": f"{API_PREFIX}/agents/{agent.id}"})


@endpoint(
    summary="Change an agent.", scope="agent:write", body=schemas.UpdateAgent, answer=Agent,
    params=(IDEMPOTENCY,), errors=(409,),
)
async def update_agent(request: Request, who: Principal) -> Response:
    agent = await _agent(request)
    _admin_only(who, agent.kind)
    raw, body = await declared_body(request)
    _check_config(agent.kind, body.config)
    return await _agent_event(request, who, agent, t.AgentUpdated(agent_id=agent.id, **sent_fields(body)), raw)


async def _agent_event(request, who, agent: Agent, event, raw: bytes) -> Response:
    changed = await record(request, who, streams.agent(agent.id), [event], agent.version, raw, agents.evolve)
    return json_response((await _with_usage(request, who, [changed]))[0])


@endpoint(
    summary="Pause an agent: runs on it are refused (503).", scope="agent:write", answer=Agent,
    body=schemas.Body, body_required=False, params=(IDEMPOTENCY,), errors=(409,),
)
async def pause_agent(request: Request, who: Principal) -> Response:
    return await _set_status(request, who, t.AgentPaused)


@endpoint(
    summary="Resume a paused agent.", scope="agent:write", answer=Agent, body=schemas.Body,
    body_required=False, params=(IDEMPOTENCY,), errors=(409,),
)
async def resume_agent(request: Request, who: Principal) -> Response:
    return await _set_status(request, who, t.AgentResumed)


async def _set_status(request: Request, who: Principal, event_type) -> Response:
    agent = await _agent(request)
    _admin_only(who, agent.kind)
    raw, _ = await declared_body(request)  # none, or `{}`: never ignored garbage
    return await _agent_event(request, who, agent, event_type(agent_id=agent.id), raw)


def routes() -> list[Route]:
    return [
        Route("/agents", list_agents, methods=["GET"]),
        Route("/agents", create_agent, methods=["POST"]),
        Route("/agents/{agent_id}", get_agent, methods=["GET"]),
        Route("/agents/{agent_id}", update_agent, methods=["PATCH"]),
        Route("/agents/{agent_id}/pause", pause_agent, methods=["POST"]),
        Route("/agents/{agent_id}/resume", resume_agent, methods=["POST"]),
    ]
