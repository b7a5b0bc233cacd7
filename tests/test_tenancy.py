"""Tenancy: a user sees and acts on the tasks of their projects only; another tenant's task
answers exactly as a missing one does (404); admin and audit:read see everything, and an
auditor's key issued for one project sees that project."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import httpx
import pytest

from service.http.auth import default_project_id
from tests.api_helpers import device, log_unchanged, refused, stream_until, wait_for
from tests.test_security import key_id

TASK_READ_WRITE = "task:read,task:write,approval:write"


def create(client: httpx.Client, content: str, **fields) -> dict:
    response = client.post("/tasks", json={"type": "prompt", "content": content, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def in_review(client: httpx.Client, content: str, project: str) -> dict:
    task = create(client, content, projectId=project, requiresApproval=True)
    assert client.post(f"/tasks/{task['id']}/run").status_code == 200
    return wait_for(lambda: (t := client.get(f"/tasks/{task['id']}").json())["status"] == "review" and t,
                    what="the run to reach review")


def approval_of(client: httpx.Client, task_id: str) -> str:
    return next(a["id"] for a in client.get("/approvals").json() if a["taskId"] == task_id)


@pytest.fixture(scope="module")
def world(shared_app_server):
    """Alice in project one, Bob in project two, each with a task in review and Bob with a
    pending one he watches; an auditor, and an auditor whose key is for project one."""
    s = shared_app_server
    admin = s.client()
    one = admin.post("/projects", json={"name": "one", "members": ["alice"]}).json()["id"]
    two = admin.post("/projects", json={"name": "two", "members": ["bob"]}).json()["id"]
    alice, bob = s.client(s.token("alice", TASK_READ_WRITE)), s.client(s.token("bob", TASK_READ_WRITE))
    a_review, b_review = in_review(alice, "alpha", one), in_review(bob, "bravo", two)
    b_pending = create(bob, "bravo pending", projectId=two, desktopId="bob-desk")
    device(bob, "bob-phone", events=["task.input_requested"])  # none of Bob's tasks asks: no notification appends
    assert bob.post(f"/tasks/{b_pending['id']}/presence", json={"deviceId": "bob-phone"}).status_code == 204
    auditor = s.token("auditor", "task:read,audit:read")
    one_auditor = s.token("auditor-one", "task:read,audit:read", project=one)
    key_id(s, one_auditor)  # the server has seen every CLI append before a test takes the log's head
    return SimpleNamespace(
        server=s, admin=admin, alice=alice, bob=bob, one=one, two=two,
        auditor=s.client(auditor), one_auditor=s.client(one_auditor),
        a_review=a_review["id"], b_review=b_review["id"], b_pending=b_pending["id"],
        a_approval=approval_of(alice, a_review["id"]), b_approval=approval_of(bob, b_review["id"]),
    )


def ids(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()}


def test_lists_show_the_callers_projects_only(world):
    w = world
    bobs = {w.b_review, w.b_pending}
    alice_sees = ids(w.alice.get("/tasks"))
    assert w.a_review in alice_sees and not alice_sees & bobs
    assert ids(w.bob.get("/tasks")) >= bobs and w.a_review not in ids(w.bob.get("/tasks"))
    for everyone in (w.admin, w.auditor):
        assert ids(everyone.get("/tasks")) >= bobs | {w.a_review}
    assert ids(w.one_auditor.get("/tasks")) == {w.a_review}
    # Filters cannot reach across: no rows and a total of 0, whatever matches elsewhere.
    for query in ({"projectId": w.two}, {"search": "bravo"}, {"desktopId": "bob-desk"}):
        response = w.alice.get("/tasks", params=query)
        assert response.json() == [] and response.headers["x-total-count"] == "0", query
    assert ids(w.alice.get("/approvals", params={"status": "all"})) == {w.a_approval}
    assert ids(w.bob.get("/approvals", params={"status": "all"})) == {w.b_approval}
    assert {w.a_approval, w.b_approval} <= ids(w.auditor.get("/approvals", params={"status": "all"}))
    assert ids(w.alice.get("/projects")) == {w.one, default_project_id("alice")}
    assert w.admin.get(f"/tasks/{w.b_review}").status_code == 200


def _fill(text: str, names: dict[str, str]) -> str:
    for name, value in names.items():
        text = text.replace("{%s}" % name, value)
    return text


def test_another_tenants_task_answers_as_a_missing_one_and_nothing_changes(world):
    w = world
    b = {"task": w.b_pending, "review": w.b_review, "approval": w.b_approval, "project": w.two}
    attempts = [
        ("GET", "/tasks/{task}", None, None), ("GET", "/tasks/{task}", None, {"asOf": "1"}),
        ("GET", "/tasks/{task}/events", None, None), ("GET", "/tasks/{task}/output", None, None),
        ("PATCH", "/tasks/{task}", {"title": "mine now"}, None), ("DELETE", "/tasks/{task}", None, None),
        ("POST", "/tasks/{task}/run", None, None), ("POST", "/tasks/{task}/cancel", None, None),
        ("POST", "/tasks/{task}/retry", None, None), ("POST", "/tasks/{task}/messages", {"message": "hi"}, None),
        ("POST", "/tasks/{review}/review", {"decision": "approve"}, None),
        ("POST", "/tasks/{task}/presence", {"deviceId": "alice-phone"}, None),
        ("DELETE", "/tasks/{task}/presence", None, {"deviceId": "bob-phone"}),
        ("GET", "/approvals/{approval}", None, None),
        ("POST", "/approvals/{approval}/resolve", {"decision": "reject"}, None),
        ("GET", "/projects/{project}", None, None),
        ("POST", "/tasks", {"type": "prompt", "content": "x", "projectId": "{project}"}, None),
        ("POST", "/tasks", {"type": "prompt", "content": "x", "dependsOn": ["{task}"]}, None),
    ]
    before = {t: w.bob.get(f"/tasks/{t}").json() for t in (w.b_pending, w.b_review)}
    with log_unchanged(w.admin):
        for method, path, body, params in attempts:
            answers = []
            for names in (b, {k: str(uuid.uuid4()) for k in b}):
                response = w.alice.request(
                    method, _fill(path, names), params=params,
                    json=json.loads(_fill(json.dumps(body), names)) if body is not None else None,
                )
                detail = refused(response, 404, mentions=())["detail"]
                for name, value in names.items():
                    detail = detail.replace(value, f"<{name}>")
                answers.append((response.json()["code"], detail))
            assert answers[0] == answers[1], f"{method} {path} tells Bob's from a missing one: {answers}"
    assert {t: w.bob.get(f"/tasks/{t}").json() for t in before} == before


def test_history_is_the_owners_and_auditors(world):
    w = world
    history = w.alice.get(f"/tasks/{w.a_review}/events").json()
    assert history and {e["stream"] for e in history} == {f"task-{w.a_review}"}
    first = history[0]["position"]
    assert w.alice.get(f"/tasks/{w.a_review}", params={"asOf": first}).json()["status"] == "pending"
    assert w.auditor.get(f"/tasks/{w.a_review}/events").json() == history
    for path, params in ((f"/tasks/{w.a_review}/events", None), (f"/tasks/{w.a_review}", {"asOf": first})):
        refused(w.bob.get(path, params=params), 404, "not_found")


def _allowed(events: list[dict], task_ids: set[str], project_ids: set[str]) -> bool:
    """Each event concerns one of these tasks or projects, or an agent (agents are shared)."""
    for event in events:
        kind, _, ident = event["stream"].partition("-")
        if not (kind == "agent" or (kind in ("task", "presence") and ident in task_ids)
                or (kind == "project" and ident in project_ids)):
            return False
    return True


def test_the_activity_stream_and_the_log_filter_by_tenancy(world):
    w = world
    alice_tasks = {t["id"] for t in w.alice.get("/tasks", params={"archived": "all", "limit": 500}).json()}
    sentinel, bob_live = f"sentinel {uuid.uuid4()}", []

    def live():  # once Alice's stream is open: Bob's activity, then Alice's last task
        bob_live.append(create(w.bob, "bravo live", projectId=w.two)["id"])
        create(w.alice, sentinel, projectId=w.one)

    seen = stream_until(w.alice, sentinel, live)
    alice_tasks.add(seen[-1]["payload"]["taskId"])
    assert _allowed(seen, alice_tasks, {w.one, default_project_id("alice")})
    assert f"task-{w.a_review}" in {e["stream"] for e in seen}
    one_tasks = {t["id"] for t in w.one_auditor.get("/tasks", params={"archived": "all", "limit": 500}).json()}
    # An auditor sees everything: Bob's tasks and presence, and the keys issued (as hashes).
    everything = stream_until(w.auditor, sentinel, lambda: None)
    streams = {e["stream"] for e in everything}
    assert {f"task-{w.b_review}", f"presence-{w.b_pending}", f"project-{w.two}", f"task-{bob_live[0]}"} <= streams
    assert any(s.startswith("apikey-") for s in streams)

    # GET /events: audit:read only; the project-one auditor reads project one's part of the log.
    refused(w.alice.get("/events"), 403, "forbidden")
    logged = w.auditor.get("/events", params={"limit": 5000}).json()["events"]
    # The whole log holds Bob's devices; an activity stream carries a user's devices to that user alone.
    assert "devices-bob" in {e["stream"] for e in logged} and "devices-bob" not in streams
    assert [e for e in logged if not e["stream"].startswith("devices-")][: len(everything)] == everything
    part = w.one_auditor.get("/events", params={"limit": 5000}).json()
    assert part["events"] and _allowed(part["events"], one_tasks, {w.one})
    assert {f"task-{w.a_review}", f"project-{w.one}"} <= {e["stream"] for e in part["events"]}
    assert part["head"] == w.auditor.get("/events", params={"limit": 1}).json()["head"]
    ndjson = w.one_auditor.get("/events", headers={"Accept": "application/x-ndjson"})
    assert [json.loads(line) for line in ndjson.text.splitlines()] == part["events"]
    asked = w.one_auditor.get("/events", params={"stream": f"task-{w.b_review}"}).json()["events"]
    assert asked == []


def test_an_auditor_reads_every_project_but_acts_only_in_its_own(world):
    w = world
    s = w.server
    auditor = s.client(s.token("writing-auditor", "task:read,task:write,approval:write,audit:read"))
    assert auditor.get(f"/tasks/{w.b_pending}").status_code == 200  # seeing everything is the scope
    with log_unchanged(w.admin):
        refused(auditor.patch(f"/tasks/{w.b_pending}", json={"content": "mine now"}), 404, "not_found")
        refused(auditor.post(f"/tasks/{w.b_pending}/cancel"), 404, "not_found")
        refused(auditor.post(f"/tasks/{w.b_review}/review", json={"decision": "approve"}), 404, "not_found")
        refused(auditor.post(f"/approvals/{w.b_approval}/resolve", json={"decision": "approve"}), 404, "not_found")
        refused(auditor.post("/tasks", json={"type": "prompt", "content": "x", "projectId": w.two}), 404, "not_found")
    assert w.bob.get(f"/tasks/{w.b_pending}").json()["status"] == "pending"


def test_a_project_key_keeps_to_its_project_while_its_user_is_a_member(world):
    w = world
    three = w.admin.post("/projects", json={"name": "three"}).json()["id"]
    carl = w.server.client(w.server.token("carl", TASK_READ_WRITE, project=three))  # makes Carl a member
    task = create(carl, "carl's")
    assert task["projectId"] == three
    refused(carl.post("/tasks", json={"type": "prompt", "content": "x", "projectId": default_project_id("carl")}),
            404, "not_found")
    members = w.admin.get(f"/projects/{three}").json()["members"]
    assert "carl" in members
    assert w.admin.patch(f"/projects/{three}", json={"members": [m for m in members if m != "carl"]}).status_code == 200
    refused(carl.get(f"/tasks/{task['id']}"), 404, "not_found")
    assert carl.get("/tasks").json() == []
    refused(carl.post("/tasks", json={"type": "prompt", "content": "x"}), 404, "not_found")


def test_an_idempotency_key_does_not_replay_across_a_users_keys(world):
    s = world.server
    four = world.admin.post("/projects", json={"name": "four"}).json()["id"]
    anywhere = s.client(s.token("dora", TASK_READ_WRITE))
    only_four = s.client(s.token("dora", TASK_READ_WRITE, project=four))
    body, key = {"type": "prompt", "content": "once"}, {"Idempotency-Key": "dora-1"}
    first = anywhere.post("/tasks", json=body, headers=key)
    assert first.status_code == 201 and first.json()["projectId"] == default_project_id("dora")
    assert anywhere.post("/tasks", json=body, headers=key).json() == first.json()
    refused(only_four.post("/tasks", json=body, headers=key), 409, "idempotency_conflict")


def test_overview_figures_are_the_services_not_a_tenants(world):
    """Documented in docs/security.md: the overview is the shared service's gauge (concurrency
    slots, load, log size); it carries counts, never ids or content."""
    alice, admin = world.alice.get("/overview"), world.admin.get("/overview")
    assert alice.status_code == admin.status_code == 200
    assert alice.json()["tasks"] == admin.json()["tasks"]


def test_me_tells_a_key_its_user_scopes_and_project(shared_app_server):
    s = shared_app_server
    admin = s.client()
    project = admin.post("/projects", json={"name": "me-project", "members": ["carol"]}).json()["id"]
    reader = s.client(s.token("carol", "task:read"))
    assert reader.get("/me").json() == {"user": "carol", "scopes": ["task:read"], "projectId": None}
    scoped = s.client(s.token("carol", "task:write,task:read", project))
    assert scoped.get("/me").json() == {"user": "carol", "scopes": ["task:read", "task:write"], "projectId": project}
    assert admin.get("/me").json()["scopes"] == ["admin"]
    assert refused(s.client(s.token("desk", "worker", desktop="desk-1")).get("/me"), 403, "forbidden")
