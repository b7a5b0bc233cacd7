"""Agents and projects through the app in this process: the registry's routes,
their refusals (with the log head unchanged), idempotency, and a paused agent taking no runs."""


import uuid

import pytest

from service.work.local import ECHO_AGENT_ID
from tests.api_helpers import head, log_unchanged, post_racing, read_log, refused, wait_for


@pytest.fixture(scope="module")
def c(api_server):
    return api_server.client()


def new_agent(c, **fields) -> dict:
    response = c.post("/agents", json={"name": f"agent-{uuid.uuid4().hex[:8]}", "kind": "echo", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def new_project(c, **fields) -> dict:
    response = c.post("/projects", json={"name": f"project-{uuid.uuid4().hex[:8]}", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def new_task(c, **fields) -> dict:
    response = c.post("/tasks", json={"type": "prompt", "content": "hello", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def status_of(c, task_id: str) -> str:
    return c.get(f"/tasks/{task_id}").json()["status"]


# --- agents -----------------------------------------------------------------------------------


def test_the_echo_agent_is_built_in(c):
    agents = c.get("/agents")
    assert agents.status_code == 200
    echo = [a for a in agents.json() if a["id"] == ECHO_AGENT_ID]
    assert echo and echo[0]["kind"] == "echo" and echo[0]["status"] == "active"
    assert c.get(f"/agents/{ECHO_AGENT_ID}").json() == echo[0]


def test_register_get_list_and_patch_an_agent(c):
    before = head(c)
    response = c.post("/agents", json={"name": "writer", "kind": "echo", "config": {"style": "terse"}})
    assert response.status_code == 201
    agent = response.json()
    assert response.headers["location"] == f"/api/mission-control/agents/{agent['id']}"
    assert {k: agent[k] for k in ("name", "kind", "config", "status")} == {
        "name": "writer", "kind": "echo", "config": {"style": "terse"}, "status": "active",
    }
    assert uuid.UUID(agent["id"]) and agent["createdAt"].endswith("Z")
    assert head(c) == before + 1
    assert c.get(f"/agents/{agent['id']}").json() == agent
    assert agent in c.get("/agents").json()

    patched = c.patch(f"/agents/{agent['id']}", json={"name": "editor", "config": {"style": "long"}})
    assert patched.status_code == 200
    assert {k: patched.json()[k] for k in ("id", "name", "config", "kind", "status", "createdAt")} == {
        **{k: agent[k] for k in ("id", "kind", "status", "createdAt")}, "name": "editor", "config": {"style": "long"},
    }
    assert c.get(f"/agents/{agent['id']}").json() == patched.json()


def test_a_paused_agent_takes_no_runs(c):
    agent = new_agent(c)
    paused = c.post(f"/agents/{agent['id']}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert c.get(f"/agents/{agent['id']}").json()["status"] == "paused"
    task = new_task(c, agentId=agent["id"])
    with log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/run"), 503, "agent_unavailable", (agent["name"],))
        refused(c.post(f"/tasks/{task['id']}/run", json={"agentId": agent["id"]}), 503, "agent_unavailable")
    assert status_of(c, task["id"]) == "pending"

    resumed = c.post(f"/agents/{agent['id']}/resume", json={})
    assert resumed.status_code == 200 and resumed.json()["status"] == "active"
    started = c.post(f"/tasks/{task['id']}/run")
    assert started.status_code == 200 and started.json()["agentId"] == agent["id"]
    wait_for(lambda: status_of(c, task["id"]) == "done", what="the run on the resumed agent")


@pytest.mark.parametrize("status", ["stopped", "error"])
def test_an_agent_not_active_takes_no_runs(c, status):
    agent = new_agent(c)
    assert c.patch(f"/agents/{agent['id']}", json={"status": status}).json()["status"] == status
    task = new_task(c)
    with log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/run", json={"agentId": agent["id"]}), 503, "agent_unavailable", (status,))


def test_run_takes_agent_id_and_agentId(c):
    agent = new_agent(c)
    for spelling in ("agentId", "agent_id"):
        task = new_task(c)
        started = c.post(f"/tasks/{task['id']}/run", json={spelling: agent["id"]})
        assert started.status_code == 200 and started.json()["agentId"] == agent["id"], started.text
        wait_for(lambda: status_of(c, task["id"]) == "done", what="the run")
        events = c.get(f"/tasks/{task['id']}/events").json()
        assert [e["payload"]["agentId"] for e in events if e["type"] == "task.started"] == [agent["id"]]
    task = new_task(c)
    with log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/run", json={"agent_id": str(uuid.uuid4())}), 404)
        refused(c.post(f"/tasks/{task['id']}/run", json={"agentId": str(uuid.uuid4())}), 404)


def test_unknown_agents_are_404_and_bad_ids_400(c):
    unknown = str(uuid.uuid4())
    with log_unchanged(c):
        for method, suffix, body in (("GET", "", None), ("PATCH", "", {"name": "x"}), ("POST", "/pause", None),
                                     ("POST", "/resume", None)):
            refused(c.request(method, f"/agents/{unknown}{suffix}", json=body), 404, "not_found")
            refused(c.request(method, f"/agents/not-an-id{suffix}", json=body), 400, "invalid_uuid", ("agent",))


@pytest.mark.parametrize("body, mentions", [
    ({"kind": "echo"}, ("name",)),
    ({"name": "", "kind": "echo"}, ("name",)),
    ({"name": "x"}, ("kind",)),
    ({"name": "x", "kind": "robot"}, ("kind",)),
    ({"name": "x", "kind": "echo", "config": []}, ("config",)),
    ({"name": "x", "kind": "echo", "config": {"t": 0.7}}, ("config",)),
    ({"name": "x", "kind": "echo", "colour": "red"}, ("colour",)),
    ({"name": 5, "kind": "echo"}, ("name",)),
])
def test_register_refuses_bad_bodies(c, body, mentions):
    with log_unchanged(c):
        refused(c.post("/agents", json=body), 400, None, mentions)


def test_agent_routes_refuse_bad_bodies(c):
    agent = new_agent(c)
    with log_unchanged(c):
        refused(c.post("/agents", content=b'{"name": "x",', headers={"Content-Type": "application/json"}), 400,
                "malformed_json")
        refused(c.post("/agents", content=b'{"name": "x", "kind": "echo"}', headers={"Content-Type": "text/plain"}),
                415)
        refused(c.patch(f"/agents/{agent['id']}", json={"status": "sleeping"}), 400, None, ("status",))
        refused(c.patch(f"/agents/{agent['id']}", json={"kind": "shell"}), 400, None, ("kind",))
        refused(c.patch(f"/agents/{agent['id']}", content=b"{", headers={"Content-Type": "application/json"}), 400)
        refused(c.post(f"/agents/{agent['id']}/pause", json={"please": True}), 400)
    assert c.get(f"/agents/{agent['id']}").json() == agent


def test_agent_scopes(c, api_server):
    operator = api_server.client(api_server.token("operator", "task:read,agent:write"))
    reader = api_server.client(api_server.token("watcher", "task:read"))
    assert reader.get("/agents").status_code == 200
    agent = operator.post("/agents", json={"name": "ops-echo", "kind": "echo"})
    assert agent.status_code == 201
    with log_unchanged(c):
        refused(reader.post("/agents", json={"name": "x", "kind": "echo"}), 403, "forbidden")
        refused(reader.post(f"/agents/{agent.json()['id']}/pause"), 403, "forbidden")
        # a shell agent runs commands on this machine: admin only
        refused(operator.post("/agents", json={"name": "sh", "kind": "shell"}), 403, "forbidden")
    assert operator.post(f"/agents/{agent.json()['id']}/pause").json()["status"] == "paused"


def test_register_is_idempotent(c, api_server):
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"name": "once", "kind": "echo"}
    first = c.post("/agents", json=body, headers=key)
    assert first.status_code == 201
    with log_unchanged(c):
        again = c.post("/agents", json=body, headers=key)
        assert again.status_code == 201 and again.json() == first.json()
        refused(c.post("/agents", json={**body, "name": "twice"}, headers=key), 409, "idempotency_conflict")

    key = {"Idempotency-Key": str(uuid.uuid4())}
    before = head(c)
    answers = post_racing(api_server, "/agents", body, key, 6)
    assert [a.status_code for a in answers] == [201] * 6, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert [e.type for e in read_log(c, before)[0]] == ["agent.registered"]


# --- projects ---------------------------------------------------------------------------------


def test_create_get_list_and_patch_a_project(c):
    response = c.post("/projects", json={"name": "Apollo", "context": "Go to the moon.", "members": ["ann"]})
    assert response.status_code == 201
    project = response.json()
    assert response.headers["location"] == f"/api/mission-control/projects/{project['id']}"
    assert {k: project[k] for k in ("name", "context", "members")} == {
        "name": "Apollo", "context": "Go to the moon.", "members": ["ann"],
    }
    assert c.get(f"/projects/{project['id']}").json() == project
    assert project in c.get("/projects").json()

    patched = c.patch(f"/projects/{project['id']}", json={"context": "And back.", "members": ["ann", "bob"]})
    assert patched.status_code == 200
    assert {k: patched.json()[k] for k in ("name", "context", "members")} == {
        "name": "Apollo", "context": "And back.", "members": ["ann", "bob"],
    }
    renamed = c.patch(f"/projects/{project['id']}", json={"name": "Artemis"}).json()
    assert renamed["name"] == "Artemis" and renamed["context"] == "And back."
    assert c.get(f"/projects/{project['id']}").json() == renamed


def test_projects_need_admin_to_change(c, api_server):
    project = new_project(c)
    writer = api_server.client(api_server.token("builder", "task:read,task:write,agent:write"))
    with log_unchanged(c):
        refused(writer.post("/projects", json={"name": "mine"}), 403, "forbidden", ("admin",))
        refused(writer.patch(f"/projects/{project['id']}", json={"name": "mine"}), 403, "forbidden")


def test_projects_are_visible_to_members_only(c, api_server):
    project = new_project(c, context="shared context")
    task = new_task(c, projectId=project["id"])
    member = api_server.client(api_server.token("carol", "task:read,task:write"))
    outsider = api_server.client(api_server.token("dave", "task:read,task:write"))
    refused(member.get(f"/projects/{project['id']}"), 404)  # not a member yet
    c.patch(f"/projects/{project['id']}", json={"members": ["carol"]})

    assert member.get(f"/projects/{project['id']}").status_code == 200
    assert project["id"] in [p["id"] for p in member.get("/projects").json()]
    assert member.get(f"/tasks/{task['id']}").status_code == 200
    listed = member.get("/tasks", params={"projectId": project["id"]})
    assert [x["id"] for x in listed.json()] == [task["id"]]
    created = member.post("/tasks", json={"type": "prompt", "content": "mine", "projectId": project["id"]})
    assert created.status_code == 201

    with log_unchanged(c):  # never leak existence: the outsider sees 404, as for no project at all
        refused(outsider.get(f"/projects/{project['id']}"), 404, "not_found")
        refused(outsider.get(f"/tasks/{task['id']}"), 404, "not_found")
        refused(outsider.post(f"/tasks/{task['id']}/cancel"), 404, "not_found")
        refused(outsider.post("/tasks", json={"type": "prompt", "content": "x", "projectId": project["id"]}), 404)
    assert project["id"] not in [p["id"] for p in outsider.get("/projects").json()]
    assert outsider.get("/tasks", params={"projectId": project["id"]}).json() == []


def test_unknown_projects_are_404_and_bad_ids_400(c):
    with log_unchanged(c):
        for method, body in (("GET", None), ("PATCH", {"name": "x"})):
            refused(c.request(method, f"/projects/{uuid.uuid4()}", json=body), 404, "not_found")
            refused(c.request(method, "/projects/p-1", json=body), 400, "invalid_uuid", ("project",))


@pytest.mark.parametrize("body, mentions", [
    ({}, ("name",)),
    ({"name": ""}, ("name",)),
    ({"name": "x", "context": 5}, ("context",)),
    ({"name": "x", "members": "ann"}, ("members",)),
    ({"name": "x", "members": [""]}, ("members",)),
    ({"name": "x", "owner": "ann"}, ("owner",)),
])
def test_project_bodies_are_checked(c, body, mentions):
    project = new_project(c)
    with log_unchanged(c):
        refused(c.post("/projects", json=body), 400, None, mentions)
        if body.get("name") != "" and "name" in body:
            patch = {k: v for k, v in body.items() if k != "name"}
            refused(c.patch(f"/projects/{project['id']}", json=patch), 400, None, mentions)
        refused(c.post("/projects", content=b'{"name": "x"}', headers={"Content-Type": "text/plain"}), 415)
        refused(c.post("/projects", content=b'{"name": ', headers={"Content-Type": "application/json"}), 400,
                "malformed_json")


def test_create_project_is_idempotent(c):
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = c.post("/projects", json={"name": "Gemini"}, headers=key)
    assert first.status_code == 201
    with log_unchanged(c):
        assert c.post("/projects", json={"name": "Gemini"}, headers=key).json() == first.json()
        refused(c.post("/projects", json={"name": "Mercury"}, headers=key), 409, "idempotency_conflict")
