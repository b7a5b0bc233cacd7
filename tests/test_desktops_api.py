"""/desktops as people see them, and /tasks/{id}/runs: in process, with workers driven by hand
over the worker routes (the worker process itself is tests/test_worker_*.py's)."""

from __future__ import annotations

import uuid

import httpx

from events import streams

from tests.api_helpers import refused
from tests.inprocess import InProcess

FIELDS = {"id", "status", "agents", "capacity", "busy", "running", "lastSeenAt", "version"}


def register(app: InProcess, name: str, capacity: int = 1) -> tuple[httpx.Client, dict]:
    """A worker key for desktop `name`, and its desktop registered with the echo kind."""
    worker = app.client(app.token("ci", "worker", desktop=name))
    answer = worker.post("/worker/register", json={
        "sessionId": str(uuid.uuid4()), "agents": ["echo"], "capacity": capacity, "version": "9.9", "hostname": "h"})
    assert answer.status_code == 200, answer.text
    return worker, answer.json()


def placed(client: httpx.Client, desktop: str) -> dict:
    """A task for `desktop`, run: placed there, and running until its worker reports."""
    task = client.post("/tasks", json={"type": "prompt", "content": "x", "desktopId": desktop}).json()
    started = client.post(f"/tasks/{task['id']}/run")
    assert started.status_code == 200, started.text
    return started.json()


def events_of(app: InProcess, desktop: str, kind: str) -> int:
    """How many `kind` events the desktop's stream holds."""
    return sum(1 for e in app.call(app.log.read_stream(streams.desktop(desktop))) if e.type == kind)


def test_desktops_are_listed_by_name_with_the_fields_of_the_contract(api_server):
    register(api_server, "zz-last", capacity=3)
    _, first = register(api_server, "aa-first")
    admin = api_server.client()
    listed = admin.get("/desktops").json()
    names = [d["id"] for d in listed]
    assert names == sorted(names) and {"aa-first", "zz-last", "local"} <= set(names)
    one = admin.get("/desktops/zz-last").json()
    assert set(one) == FIELDS
    assert one == {**one, "status": "online", "agents": ["echo"], "capacity": 3, "busy": 0, "running": [],
                   "version": "9.9"}
    assert one["lastSeenAt"].endswith("Z")
    assert first["desktop"] == admin.get("/desktops/aa-first").json()  # register answers the same object
    assert one in listed
    refused(admin.get("/desktops/no-such-box"), 404, "not_found")
    refused(admin.get("/desktops/Not%20A%20Name"), 400)


def test_drain_and_resume_are_idempotent_and_record_one_event_each(api_server):
    register(api_server, "box-drain")
    admin = api_server.client()
    for _ in range(2):
        drained = admin.post("/desktops/box-drain/drain")
        assert drained.status_code == 200, drained.text
        assert drained.json()["status"] == "draining"
    assert events_of(api_server, "box-drain", "desktop.draining") == 1
    online_before = events_of(api_server, "box-drain", "desktop.online")
    for _ in range(2):
        resumed = admin.post("/desktops/box-drain/resume")
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["status"] == "online"
    assert events_of(api_server, "box-drain", "desktop.online") == online_before + 1
    reader = api_server.client(api_server.token("reader", "task:read,task:write"))
    refused(reader.post("/desktops/box-drain/drain"), 403)
    refused(admin.post("/desktops/no-such-box/drain"), 404)


def test_only_an_offline_desktop_can_be_removed(api_server):
    worker, _ = register(api_server, "box-gone")
    admin = api_server.client()
    refused(admin.delete("/desktops/box-gone"), 409, "invalid_status")
    assert admin.get("/desktops/box-gone").json()["status"] == "online"
    assert worker.post("/worker/leave").status_code == 204
    assert admin.get("/desktops/box-gone").json()["status"] == "offline"
    assert admin.delete("/desktops/box-gone").status_code == 204
    refused(admin.get("/desktops/box-gone"), 404)
    assert "box-gone" not in [d["id"] for d in admin.get("/desktops").json()]
    assert events_of(api_server, "box-gone", "desktop.removed") == 1
    refused(admin.delete("/desktops/box-gone"), 404)


def test_running_lists_the_runs_the_caller_may_see_and_busy_counts_them_all(api_server):
    register(api_server, "box-shared", capacity=2)
    alice = api_server.client(api_server.token("alice", "task:read,task:write"))
    bob = api_server.client(api_server.token("bob", "task:read,task:write"))
    alices, bobs = placed(alice, "box-shared")["runId"], placed(bob, "box-shared")["runId"]
    for who, sees in ((alice, [alices]), (bob, [bobs]), (api_server.client(), sorted([alices, bobs]))):
        desktop = who.get("/desktops/box-shared").json()
        assert desktop["busy"] == 2
        assert sorted(desktop["running"]) == sees
        assert [d for d in who.get("/desktops").json() if d["id"] == "box-shared"] == [desktop]


def test_a_tasks_runs_name_their_desktop_exit_code_and_reason(api_server):
    worker, registered = register(api_server, "box-runs")
    admin = api_server.client()
    task = placed(admin, "box-runs")
    run_id = task["runId"]
    lease = {"MC-Lease": f"{run_id}:{registered['epoch']}"}
    ended = worker.post(f"/worker/runs/{run_id}/finish", headers=lease, json={
        "outcome": "failed", "reason": "exit", "exitCode": 3, "error": "exit status 3", "lastSeq": 0})
    assert ended.status_code == 200, ended.text
    assert ended.json() == {"status": "failed"}
    runs = admin.get(f"/tasks/{task['id']}/runs").json()
    assert len(runs) == 1
    assert runs[0] == {**runs[0], "runId": run_id, "number": 1, "desktopId": "box-runs", "status": "failed",
                       "exitCode": 3, "reason": "exit", "error": "exit status 3"}
    assert runs[0]["startedAt"] and runs[0]["endedAt"]
    outsider = api_server.client(api_server.token("outsider", "task:read"))
    refused(outsider.get(f"/tasks/{task['id']}/runs"), 404)


def test_reports_answer_what_a_worker_needs_to_go_on(api_server):
    worker, registered = register(api_server, "box-reports")
    admin = api_server.client()
    task = placed(admin, "box-reports")
    run_id = task["runId"]
    lease = {"MC-Lease": f"{run_id}:{registered['epoch']}"}
    head = api_server.call(api_server.log.read_head())
    gap = worker.post(f"/worker/runs/{run_id}/output", headers=lease,
                      json={"chunks": [{"seq": 2, "stream": "stdout", "chunk": "two\n"}]})
    assert refused(gap, 409, "output_gap")["expectedSeq"] == 1
    assert api_server.call(api_server.log.read_head()) == head
    ending = {"outcome": "done", "result": "ok", "lastSeq": 1,
              "output": [{"seq": 1, "stream": "stdout", "chunk": "one\n"}]}
    first = worker.post(f"/worker/runs/{run_id}/finish", headers=lease, json=ending)
    assert first.status_code == 200, first.text
    head = api_server.call(api_server.log.read_head())
    again = worker.post(f"/worker/runs/{run_id}/finish", headers=lease, json=ending)  # its answer was lost
    assert again.json() == first.json() == {"status": "done"}
    assert api_server.call(api_server.log.read_head()) == head
    assert admin.get(f"/tasks/{task['id']}/output").text == "one\n"


def test_overview_counts_the_desktops_online(api_server):
    admin = api_server.client()

    def active() -> int:
        return admin.get("/overview").json()["activeDesktops"]

    online = sum(1 for d in admin.get("/desktops").json() if d["status"] == "online")
    assert active() == online
    register(api_server, "box-counted")
    assert active() == online + 1
    admin.post("/desktops/box-counted/drain")
    assert active() == online
