"""The task lifecycle of API.md through the app in this process (a real server where the client
is a raw socket): every task, approval, presence, overview and log route, every row of the
status-code table, and for every refused request, the log head unchanged."""

from tests.server import cli

import json
import socket
import uuid
from collections import Counter
from contextlib import contextmanager

import httpx
import pytest

from events import Meta
from events import types as t
from service.work.local import ECHO_AGENT_ID
from tests.api_helpers import (
    as_json, device, head, log_unchanged, no_unhandled_errors, post_racing, read_log, refused, refused_once_revoked,
    wait_for,
)

MiB = 1024 * 1024
LONG = {"echo": {"delayMs": 60_000, "chunks": 1}}
"""Echo metadata for a run that stays `running` until the test cancels it."""


@pytest.fixture(scope="module")
def c(api_server):
    return api_server.client()


@pytest.fixture(scope="module")
def watcher(api_server):
    """Another user, who marks presence from devices of theirs on tasks that never change again:
    nothing notifies them, so nothing is appended behind a test's back."""
    client = api_server.client(api_server.token("watcher", "admin"))
    for name in ("laptop", "phone", "steady", "d1"):
        device(client, name)
    return client


def create(c: httpx.Client, **fields) -> dict:
    response = c.post("/tasks", json={"type": "prompt", "content": "hello", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def get(c: httpx.Client, task_id: str, **params) -> dict:
    response = c.get(f"/tasks/{task_id}", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def wait_status(c: httpx.Client, task_id: str, *statuses: str) -> dict:
    def reached():
        task = get(c, task_id)
        return task if task["status"] in statuses else None

    return wait_for(reached, what=f"task {task_id} to be {'/'.join(statuses)}")


def run(c: httpx.Client, task_id: str, **body) -> dict:
    response = c.post(f"/tasks/{task_id}/run", json=body) if body else c.post(f"/tasks/{task_id}/run")
    assert response.status_code == 200, response.text
    return response.json()


def events_of(c: httpx.Client, task_id: str) -> list[dict]:
    response = c.get(f"/tasks/{task_id}/events", params={"limit": 5000})
    assert response.status_code == 200, response.text
    return response.json()


def types_of(c: httpx.Client, task_id: str) -> list[str]:
    return [e["type"] for e in events_of(c, task_id)]


def finished(c: httpx.Client, status: str, **fields) -> dict:
    """A task brought to `status` through the API."""
    if status == "pending":
        return create(c, **fields)
    if status == "running":
        task = create(c, metadata=LONG, **fields)
        return run(c, task["id"])
    if status == "awaiting_input":
        task = create(c, metadata={"echo": {"ask": "which one?"}}, **fields)
        run(c, task["id"])
        return wait_status(c, task["id"], "awaiting_input")
    if status == "done":
        task = create(c, **fields)
        run(c, task["id"])
        return wait_status(c, task["id"], "done")
    if status == "failed":
        task = create(c, metadata={"echo": {"fail": "on purpose"}}, **fields)
        run(c, task["id"])
        return wait_status(c, task["id"], "failed")
    if status == "review":
        task = create(c, requiresApproval=True, **fields)
        run(c, task["id"])
        return wait_status(c, task["id"], "review")
    if status == "cancelled":
        task = create(c, **fields)
        assert c.post(f"/tasks/{task['id']}/cancel").status_code == 200
        return get(c, task["id"])
    raise ValueError(status)


@contextmanager
def in_status(c: httpx.Client, status: str, **fields):
    """A task in `status`; a run still in progress is cancelled afterwards, freeing its slot."""
    task = finished(c, status, **fields)
    try:
        yield task
    finally:
        if status in ("running", "awaiting_input"):
            c.post(f"/tasks/{task['id']}/cancel")


# --- creating and reading ----------------------------------------------------------------


def test_create_answers_201_with_location_etag_and_defaults(c):
    before = head(c)
    response = c.post("/tasks", json={"type": "prompt", "content": "write a haiku"})
    assert response.status_code == 201
    task = response.json()
    assert response.headers["location"] == f"/api/mission-control/tasks/{task['id']}"
    assert response.headers["etag"] == '"1"'
    assert uuid.UUID(task["id"])
    expected = {
        "type": "prompt", "content": "write a haiku", "title": None, "description": None, "status": "pending",
        "desktopId": None, "agentId": None, "requiresApproval": False, "priority": 5, "timeoutSeconds": None,
        "metadata": {}, "dependsOn": [], "webhookUrl": None, "createdBy": "admin", "startedAt": None,
        "completedAt": None, "archived": False, "version": 1, "runs": 0, "result": None, "error": None,
        "watchers": [],
    }
    assert {k: task[k] for k in expected} == expected
    assert uuid.UUID(task["projectId"]) and task["createdAt"].endswith("Z")
    assert head(c) == before + 1

    fetched = c.get(response.headers["location"].removeprefix("/api/mission-control"))
    assert fetched.status_code == 200 and fetched.headers["etag"] == '"1"'
    assert fetched.json() == task


def test_create_keeps_every_field(c):
    dep = finished(c, "done")
    body = {
        "type": "command", "content": "echo hi", "title": "Greeting", "description": "says hi",
        "desktopId": "desk-7", "agentId": ECHO_AGENT_ID, "requiresApproval": True, "priority": 9,
        "timeoutSeconds": 120, "metadata": {"k": [1, "two", {"three": None}]}, "dependsOn": [dep["id"]],
        "webhookUrl": "https://example.invalid/hook",
    }
    task = create(c, **body)
    assert {k: task[k] for k in body} == body
    assert get(c, task["id"]) == task


def test_a_task_runs_to_done_with_its_output(c):
    task = create(c, content="the quick brown fox jumps", metadata={"echo": {"chunks": 3}})
    started = run(c, task["id"])
    assert started["status"] == "running" and started["runs"] == 1 and started["agentId"] == ECHO_AGENT_ID
    assert started["startedAt"] and started["version"] == 2
    done = wait_status(c, task["id"], "done")
    assert done["result"] == "the quick brown fox jumps" and done["completedAt"] and done["error"] is None

    kinds = types_of(c, task["id"])
    assert kinds[:2] == ["task.created", "task.started"] and kinds[-1] == "task.completed"
    assert set(kinds[2:-1]) == {"task.output"}
    output = c.get(f"/tasks/{task['id']}/output")
    assert output.status_code == 200 and output.headers["content-type"].startswith("text/plain")
    assert output.text == "the quick brown fox jumps"


def test_output_is_per_run(c):
    failed = finished(c, "failed", content="first run")
    first_run = failed["runId"]
    assert c.post(f"/tasks/{failed['id']}/retry").json()["status"] == "pending"
    # Back in pending, the content may change again; metadata (any time) drops the failure.
    assert c.patch(f"/tasks/{failed['id']}", json={"content": "second run", "metadata": {}}).status_code == 200
    run(c, failed["id"])
    done = wait_status(c, failed["id"], "done")
    assert done["runs"] == 2 and done["runId"] != first_run
    assert c.get(f"/tasks/{failed['id']}/output").text == "second run"
    assert c.get(f"/tasks/{failed['id']}/output", params={"runId": first_run}).text == "first run"
    refused(c.get(f"/tasks/{failed['id']}/output", params={"runId": str(uuid.uuid4())}), 404, "not_found")
    # History keeps every run.
    assert types_of(c, failed["id"]).count("task.started") == 2


def test_task_events_are_the_tasks_stream_in_order_with_paging(c):
    task = finished(c, "done")
    everything = events_of(c, task["id"])
    assert [e["version"] for e in everything] == list(range(1, len(everything) + 1))
    assert {e["stream"] for e in everything} == {f"task-{task['id']}"}
    assert all(e["payload"]["taskId"] == task["id"] for e in everything)
    assert everything[0]["meta"]["actor"] == "admin"

    paged, after = [], 0
    while True:
        response = c.get(f"/tasks/{task['id']}/events", params={"after": after, "limit": 2})
        assert response.status_code == 200
        if not response.json():
            break
        paged += response.json()
        after = paged[-1]["position"]
    assert paged == everything


def test_as_of_answers_the_task_as_it_stood(c):
    task = create(c, title="before")
    created_at = head(c)
    c.patch(f"/tasks/{task['id']}", json={"title": "after"})
    patched_at = head(c)
    run(c, task["id"])
    wait_status(c, task["id"], "done")

    then = c.get(f"/tasks/{task['id']}", params={"asOf": created_at})
    assert then.status_code == 200 and then.headers["etag"] == '"1"'
    assert then.json()["title"] == "before" and then.json()["status"] == "pending"
    assert get(c, task["id"], asOf=patched_at)["title"] == "after"
    now = get(c, task["id"])
    assert get(c, task["id"], asOf=head(c)) == now
    refused(c.get(f"/tasks/{task['id']}", params={"asOf": created_at - 1}), 404, "not_found")


def test_etag_and_if_match(c):
    task = create(c, title="one")
    response = c.patch(f"/tasks/{task['id']}", json={"title": "two"}, headers={"If-Match": '"1"'})
    assert response.status_code == 200 and response.headers["etag"] == '"2"'
    with log_unchanged(c):
        refused(c.patch(f"/tasks/{task['id']}", json={"title": "three"}, headers={"If-Match": '"1"'}), 412)
        refused(c.delete(f"/tasks/{task['id']}", headers={"If-Match": '"1"'}), 412)
    assert get(c, task["id"])["title"] == "two"
    assert c.patch(f"/tasks/{task['id']}", json={"title": "3"}, headers={"If-Match": 'W/"2"'}).status_code == 200
    assert c.delete(f"/tasks/{task['id']}", headers={"If-Match": '"3"'}).status_code == 204


def test_if_match_star_and_lists(c):
    task = c.post("/tasks", json={"type": "prompt", "content": "x"}).json()
    assert c.patch(f"/tasks/{task['id']}", json={"title": "a"}, headers={"If-Match": "*"}).json()["version"] == 2
    assert c.patch(f"/tasks/{task['id']}", json={"title": "b"}, headers={"If-Match": '"1", "2"'}).status_code == 200
    with log_unchanged(c):
        refused(c.patch(f"/tasks/{task['id']}", json={"title": "c"}, headers={"If-Match": '"1", "2"'}), 412)


def test_an_idempotency_key_compares_json_not_bytes(c):
    key = {"Idempotency-Key": f"json-{uuid.uuid4()}", "Content-Type": "application/json"}
    first = c.post("/tasks", content=b'{"type": "prompt", "content": "same"}', headers=key)
    with log_unchanged(c):
        again = c.post("/tasks", content=b'{"content":"same",\n "type":"prompt"}', headers=key)
    assert (first.status_code, again.status_code) == (201, 201) and again.json()["id"] == first.json()["id"]


# --- the state machine's 409s --------------------------------------------------------------

RESTRICTED = {
    "content": "new content", "description": "new", "priority": 2, "timeoutSeconds": 30,
    "desktopId": "elsewhere", "requiresApproval": True,
}


@pytest.mark.parametrize("status", ["running", "awaiting_input", "review", "done", "failed", "cancelled"])
def test_run_needs_pending(c, status):
    with in_status(c, status) as task, log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/run"), 409, "invalid_status", ("pending",))


@pytest.mark.parametrize("status", ["done", "failed", "review"])
def test_cancel_refused_once_finished(c, status):
    with in_status(c, status) as task, log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/cancel"), 409, "invalid_status")
        assert get(c, task["id"])["status"] == status


def test_cancel_pending_and_cancel_again(c):
    task = create(c)
    response = c.post(f"/tasks/{task['id']}/cancel", json={"reason": "not needed"})
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert "not needed" in response.json()["error"]
    with log_unchanged(c):  # cancelling a cancelled task: 200, nothing appended
        again = c.post(f"/tasks/{task['id']}/cancel", json={"reason": "still not"})
        assert again.status_code == 200 and again.json() == response.json()


@pytest.mark.parametrize("status", ["running", "awaiting_input"])
def test_cancel_stops_the_run(c, status):
    with in_status(c, status) as task:
        response = c.post(f"/tasks/{task['id']}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
    # Another run completing end to end outlives any output the cancelled run could still produce.
    finished(c, "done")
    assert types_of(c, task["id"])[-1] == "task.cancelled"
    assert get(c, task["id"])["status"] == "cancelled"
    refused(c.post(f"/tasks/{task['id']}/messages", json={"message": "too late"}), 409, "invalid_status")


@pytest.mark.parametrize("status", ["pending", "running", "awaiting_input", "review", "done"])
def test_retry_needs_failed_or_cancelled(c, status):
    with in_status(c, status) as task, log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/retry"), 409, "invalid_status", ("failed", "cancelled"))


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_retry_returns_to_pending(c, status):
    task = finished(c, status)
    response = c.post(f"/tasks/{task['id']}/retry")
    assert response.status_code == 200 and response.json()["status"] == "pending"
    assert types_of(c, task["id"])[-1] == "task.retried"
    run(c, task["id"])  # a new run; the failing echo fails again, which is fine
    wait_status(c, task["id"], "done", "failed")


@pytest.mark.parametrize("status", ["pending", "review", "done", "failed", "cancelled"])
def test_messages_need_a_live_run(c, status):
    with in_status(c, status) as task, log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/messages", json={"message": "hi"}), 409, "invalid_status")


def test_a_message_answers_the_agents_question(c):
    task = finished(c, "awaiting_input", content="pick")
    assert task["inputPrompt"] == "which one?"
    response = c.post(f"/tasks/{task['id']}/messages", json={"message": "the blue one"})
    assert response.status_code == 202
    done = wait_status(c, task["id"], "done")
    assert done["result"] == "pick\nthe blue one"
    kinds = types_of(c, task["id"])
    assert kinds.index("task.input_requested") < kinds.index("task.message") < kinds.index("task.completed")


def test_a_message_to_a_running_task_is_accepted(c):
    with in_status(c, "running") as task:
        assert c.post(f"/tasks/{task['id']}/messages", json={"message": "keep going"}).status_code == 202
        assert types_of(c, task["id"])[-1] == "task.message"
        assert get(c, task["id"])["status"] == "running"


@pytest.mark.parametrize("status", ["pending", "running", "done", "failed", "cancelled"])
def test_review_needs_review(c, status):
    with in_status(c, status) as task, log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/review", json={"decision": "approve"}), 409, "invalid_status")


@pytest.mark.parametrize("status", ["running", "review", "done", "failed", "cancelled"])
def test_patch_of_restricted_fields_needs_pending(c, status):
    with in_status(c, status) as task:
        with log_unchanged(c):
            for field, value in RESTRICTED.items():
                value = not task[field] if field == "requiresApproval" else value
                refused(c.patch(f"/tasks/{task['id']}", json={field: value}), 409, "invalid_status", (field,))
        # title, metadata and archived change at any time
        response = c.patch(f"/tasks/{task['id']}", json={"title": "renamed", "metadata": {"n": 1}, "archived": True})
        assert response.status_code == 200, response.text
        assert {k: response.json()[k] for k in ("title", "metadata", "archived", "status")} == {
            "title": "renamed", "metadata": {"n": 1}, "archived": True, "status": status,
        }
        assert response.headers["etag"] == f'"{response.json()["version"]}"'


def test_patch_while_pending_changes_everything(c):
    task = create(c)
    response = c.patch(f"/tasks/{task['id']}", json={**RESTRICTED, "title": "t", "metadata": {"a": "b"}})
    assert response.status_code == 200
    changed = response.json()
    assert {k: changed[k] for k in RESTRICTED} == RESTRICTED
    assert changed["version"] == 2 and types_of(c, task["id"]) == ["task.created", "task.updated"]
    with log_unchanged(c):  # the same values again change nothing
        assert c.patch(f"/tasks/{task['id']}", json=RESTRICTED).json() == changed


def test_run_waits_for_dependencies(c):
    dependency = create(c, content="first")
    task = create(c, content="second", dependsOn=[dependency["id"]])
    with log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/run"), 409, "dependency_not_done", (dependency["id"],))
    run(c, dependency["id"])
    wait_status(c, dependency["id"], "done")
    run(c, task["id"])
    wait_status(c, task["id"], "done")


def test_run_with_an_unknown_agent_is_404_and_agent_id_is_accepted(c):
    task = create(c)
    with log_unchanged(c):
        refused(c.post(f"/tasks/{task['id']}/run", json={"agentId": str(uuid.uuid4())}), 404)
        refused(c.post(f"/tasks/{task['id']}/run", json={"agent_id": str(uuid.uuid4())}), 404)
    assert run(c, task["id"], agent_id=ECHO_AGENT_ID)["agentId"] == ECHO_AGENT_ID


# --- approvals: one decision, two doors -----------------------------------------------------


def _review_append(c, task_id: str) -> tuple[list[dict], str]:
    events = events_of(c, task_id)
    kinds = [e["type"] for e in events]
    at = kinds.index("task.review")
    assert kinds[at + 1] == "approval.created"
    # one append: adjacent positions in the task's stream, written under the same meta
    assert events[at + 1]["position"] == events[at]["position"] + 1
    assert events[at + 1]["meta"] == events[at]["meta"]
    assert events[at + 1]["payload"]["runId"] == events[at]["payload"]["runId"]
    return events, events[at + 1]["payload"]["approvalId"]


def _decision_append(c, task_id: str, request_id: str, outcome: str) -> None:
    events = [e for e in events_of(c, task_id) if e["meta"]["requestId"] == request_id]
    assert [e["type"] for e in events] == ["approval.resolved", outcome]
    assert events[1]["position"] == events[0]["position"] + 1


def test_review_door_resolves_the_approval_in_the_same_append(c):
    task = finished(c, "review", content="ship it")
    assert task["result"] == "ship it"
    _, approval_id = _review_append(c, task["id"])
    assert task["approvalId"] == approval_id
    pending = c.get("/approvals").json()
    mine = [a for a in pending if a["id"] == approval_id]
    assert mine and mine[0]["status"] == "pending" and mine[0]["taskId"] == task["id"]
    summary = {"id": task["id"], "type": "prompt", "content": "ship it", "desktopId": None, "title": None}
    assert mine[0]["task"] == summary

    request_id = str(uuid.uuid4())
    response = c.post(
        f"/tasks/{task['id']}/review", json={"decision": "approve", "feedback": "lovely"},
        headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 200 and response.json()["status"] == "done"
    assert response.json()["result"] == "ship it"
    _decision_append(c, task["id"], request_id, "task.completed")
    approval = c.get(f"/approvals/{approval_id}").json()
    assert approval["status"] == "approved" and approval["resolvedBy"] == "admin" and approval["feedback"] == "lovely"
    assert approval["resolvedAt"]
    with log_unchanged(c):
        refused(c.post(f"/approvals/{approval_id}/resolve", json={"decision": "reject"}), 409, "invalid_status")
        refused(c.post(f"/tasks/{task['id']}/review", json={"decision": "reject"}), 409, "invalid_status")
    assert all(a["id"] != approval_id for a in c.get("/approvals").json())


def test_approval_door_resolves_the_task_in_the_same_append(c):
    task = finished(c, "review")
    _, approval_id = _review_append(c, task["id"])
    request_id = str(uuid.uuid4())
    response = c.post(
        f"/approvals/{approval_id}/resolve", json={"decision": "reject", "feedback": "too long"},
        headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 200
    approval = response.json()
    assert approval["status"] == "rejected" and approval["feedback"] == "too long" and approval["resolvedBy"] == "admin"
    _decision_append(c, task["id"], request_id, "task.failed")
    failed = get(c, task["id"])
    assert failed["status"] == "failed" and "too long" in failed["error"]
    with log_unchanged(c):
        refused(c.post(f"/approvals/{approval_id}/resolve", json={"decision": "approve"}), 409, "invalid_status")
        refused(c.post(f"/tasks/{task['id']}/review", json={"decision": "approve"}), 409, "invalid_status")


def test_task_completed_carries_the_deliverable_through_either_door_of_approval(c):
    """The same event means the same thing whichever way led to it: a completion after review
    carries the run's result, as a completion without review does."""
    def completed(task_id: str) -> dict:
        (event,) = [e for e in events_of(c, task_id) if e["type"] == "task.completed"]
        return event["payload"]

    direct = finished(c, "done", content="no review")
    reviewed = finished(c, "review", content="the review door")
    resolved = finished(c, "review", content="the approvals door")
    assert c.post(f"/tasks/{reviewed['id']}/review", json={"decision": "approve"}).status_code == 200
    answer = c.post(f"/approvals/{resolved['approvalId']}/resolve", json={"decision": "approve"})
    assert answer.status_code == 200, answer.text

    assert completed(direct["id"])["result"] == "no review"
    assert completed(reviewed["id"])["result"] == "the review door"
    assert completed(resolved["id"])["result"] == "the approvals door"
    assert get(c, resolved["id"])["result"] == "the approvals door"


def test_approvals_list_by_status_oldest_first(c):
    first, second, third = (finished(c, "review") for _ in range(3))
    ids = [t["approvalId"] for t in (first, second, third)]
    pending = [a["id"] for a in c.get("/approvals").json()]
    assert [i for i in pending if i in ids] == ids
    c.post(f"/tasks/{first['id']}/review", json={"decision": "approve"})
    c.post(f"/approvals/{ids[1]}/resolve", json={"decision": "reject"})

    def listed(status):
        response = c.get("/approvals", params={"status": status})
        assert response.status_code == 200
        return [a["id"] for a in response.json() if a["id"] in ids]

    assert listed("pending") == [ids[2]]
    assert listed("approved") == [ids[0]]
    assert listed("rejected") == [ids[1]]
    assert listed("all") == ids
    c.post(f"/approvals/{ids[2]}/resolve", json={"decision": "approve"})


# --- presence -------------------------------------------------------------------------------


def test_presence_marks_and_clears_watchers(c, watcher):
    task = create(c)
    path = f"/tasks/{task['id']}/presence"
    version = task["version"]
    assert watcher.post(path, json={"deviceId": "laptop"}).status_code == 204
    assert watcher.post(path, json={"deviceId": "laptop"}).status_code == 204  # an upsert, not a second watcher
    assert watcher.post(path, json={"deviceId": "phone"}).status_code == 204
    watched = get(c, task["id"])
    assert sorted(watched["watchers"]) == ["laptop", "phone"]
    assert watched["version"] == version  # watching a task does not move its version
    listed = [x for x in c.get("/tasks", params={"limit": 500}).json() if x["id"] == task["id"]]
    assert sorted(listed[0]["watchers"]) == ["laptop", "phone"]

    assert watcher.request("DELETE", path, json={"deviceId": "laptop"}).status_code == 204
    assert get(c, task["id"])["watchers"] == ["phone"]
    assert watcher.delete(path, params={"deviceId": "phone"}).status_code == 204
    assert get(c, task["id"])["watchers"] == []
    with log_unchanged(c):  # clearing a device that is not there appends nothing
        assert watcher.delete(path, params={"deviceId": "tablet"}).status_code == 204
        # and only the caller's own devices mark presence: they decide who is notified
        refused(watcher.post(path, json={"deviceId": "tablet"}), 404, "not_found", ("tablet", "POST /devices"))
        refused(c.post(path, json={"deviceId": "laptop"}), 404, "not_found", ("laptop",))  # the watcher's, not c's


def test_presence_expires_at_read_time(c, watcher, api_server):
    """API.md fixes the live time at 60 s; waiting that long is too slow for a test, so a mark
    with a 3 s lifetime is appended to the app's log by the test. Expiry is then judged at read
    time, with no event to clear it."""
    task = create(c)
    assert watcher.post(f"/tasks/{task['id']}/presence", json={"deviceId": "steady"}).status_code == 204
    api_server.call(api_server.log.append(
        f"presence-{task['id']}", [t.PresenceMarked(task_id=task["id"], device_id="brief", ttl_seconds=3)],
        meta=Meta(actor="test"),
    ))
    assert sorted(get(c, task["id"])["watchers"]) == ["brief", "steady"]
    wait_for(lambda: get(c, task["id"])["watchers"] == ["steady"], what="the brief mark to expire")
    stream = c.get("/events", params={"stream": f"presence-{task['id']}"}).json()["events"]
    assert [e["type"] for e in stream] == ["presence.marked", "presence.marked"]


# --- archiving --------------------------------------------------------------------------------


def test_delete_archives_by_tombstone(c):
    task = create(c, content="to be archived")
    response = c.delete(f"/tasks/{task['id']}")
    assert response.status_code == 204 and response.content == b""
    assert types_of(c, task["id"]) == ["task.created", "task.archived"]
    archived = get(c, task["id"])
    assert archived["archived"] is True and archived["content"] == "to be archived"

    def listed(**params):
        return [x["id"] for x in c.get("/tasks", params={"limit": 500, **params}).json()]

    assert task["id"] not in listed()
    assert task["id"] in listed(archived="true")
    assert task["id"] in listed(archived="all")
    assert task["id"] not in listed(archived="false")
    with log_unchanged(c):
        assert c.delete(f"/tasks/{task['id']}").status_code == 204
    restored = c.patch(f"/tasks/{task['id']}", json={"archived": False})
    assert restored.status_code == 200 and restored.json()["archived"] is False
    assert task["id"] in listed()


# --- listing --------------------------------------------------------------------------------


def test_listing_filters_searches_and_pages_newest_first(c):
    project = c.post("/projects", json={"name": f"listing-{uuid.uuid4()}"}).json()
    made = [
        create(c, projectId=project["id"], title="Alpha report", content="plain", desktopId="local"),
        create(c, projectId=project["id"], title="Beta", content="has 100% and a_b in it", desktopId="desk-b"),
        create(c, projectId=project["id"], title=None, content="gamma alpha", desktopId="local"),
        create(c, projectId=project["id"], title="Delta", content="plain", desktopId="desk-b"),
        create(c, projectId=project["id"], title="Epsilon", content="plain"),
    ]
    ids = [m["id"] for m in made]
    run(c, ids[0])
    wait_status(c, ids[0], "done")
    c.post(f"/tasks/{ids[1]}/cancel")
    c.delete(f"/tasks/{ids[3]}")

    def listed(**params):
        response = c.get("/tasks", params={"projectId": project["id"], **params})
        assert response.status_code == 200, response.text
        return [x["id"] for x in response.json()], int(response.headers["x-total-count"])

    live = [ids[4], ids[2], ids[1], ids[0]]  # newest first, the archived one hidden
    assert listed() == (live, 4)
    assert listed(archived="all") == ([ids[4], ids[3], ids[2], ids[1], ids[0]], 5)
    assert listed(archived="true") == ([ids[3]], 1)
    assert listed(limit=3) == (live[:3], 4)
    assert listed(limit=3, offset=3) == (live[3:], 4)
    assert listed(offset=10) == ([], 4)
    assert listed(status="pending") == ([ids[4], ids[2]], 2)
    assert listed(status="done,cancelled") == ([ids[1], ids[0]], 2)
    assert listed(desktopId="local") == ([ids[2], ids[0]], 2)
    assert listed(agentId=ECHO_AGENT_ID) == ([ids[0]], 1)
    assert listed(agentId=str(uuid.uuid4())) == ([], 0)
    assert listed(search="alpha") == ([ids[2], ids[0]], 2)  # in the title or the content
    assert listed(search="100%") == ([ids[1]], 1)  # LIKE wildcards are literal
    assert listed(search="a_b") == ([ids[1]], 1)
    assert listed(search="Alpha", status="done") == ([ids[0]], 1)
    assert listed(projectId=str(uuid.uuid4())) == ([], 0)
    every = c.get("/tasks", params={"limit": 500, "archived": "all"})
    assert int(every.headers["x-total-count"]) >= 5


# --- idempotency ----------------------------------------------------------------------------


def test_idempotent_create(c):
    body = {"type": "prompt", "content": "once only"}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = c.post("/tasks", json=body, headers=key)
    assert first.status_code == 201
    with log_unchanged(c):
        again = c.post("/tasks", json=body, headers=key)
        assert again.status_code == 201
        assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
        other = c.post("/tasks", json={**body, "content": "something else"}, headers=key)
        refused(other, 409, "idempotency_conflict")


def test_idempotent_create_under_concurrency(c, api_server):
    """Requests racing with one key: one task, and every answer is its 201."""
    body = {"type": "prompt", "content": "raced"}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    before = head(c)
    answers = post_racing(api_server, "/tasks", body, key, 8)
    assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    created = [e for e in read_log(c, before)[0] if e.type == "task.created"]
    assert len(created) == 1


def test_idempotent_commands(c, watcher, api_server):
    task = create(c, metadata={"echo": {"ask": "go?"}})
    key = {"Idempotency-Key": str(uuid.uuid4())}
    started = c.post(f"/tasks/{task['id']}/run", headers=key)
    assert started.status_code == 200
    wait_status(c, task["id"], "awaiting_input")  # the runner's own appends are done
    with log_unchanged(c):
        assert c.post(f"/tasks/{task['id']}/run", headers=key).json() == started.json()
    key = {"Idempotency-Key": str(uuid.uuid4())}
    assert c.post(f"/tasks/{task['id']}/messages", json={"message": "yes"}, headers=key).status_code == 202
    done = wait_status(c, task["id"], "done")
    with log_unchanged(c):
        assert c.post(f"/tasks/{task['id']}/messages", json={"message": "yes"}, headers=key).status_code == 202
        refused(c.post(f"/tasks/{task['id']}/messages", json={"message": "no"}, headers=key), 409)
    assert types_of(c, task["id"]).count("task.message") == 1 and get(c, task["id"]) == done

    key = {"Idempotency-Key": str(uuid.uuid4())}
    presence = f"/tasks/{task['id']}/presence"
    assert watcher.post(presence, json={"deviceId": "d1"}, headers=key).status_code == 204
    with log_unchanged(c):
        assert watcher.post(presence, json={"deviceId": "d1"}, headers=key).status_code == 204

    failed = finished(c, "failed")
    key = {"Idempotency-Key": str(uuid.uuid4())}
    retried = c.post(f"/tasks/{failed['id']}/retry", headers=key)
    assert retried.status_code == 200
    with log_unchanged(c):
        assert c.post(f"/tasks/{failed['id']}/retry", headers=key).json() == retried.json()


def test_idempotent_run_under_concurrency(c, api_server):
    """Racing runs with one key: one run started, one agent launched, every answer the same 200."""
    task = create(c, content="one run")
    key = {"Idempotency-Key": str(uuid.uuid4())}
    answers = post_racing(api_server, f"/tasks/{task['id']}/run", None, key, 6)
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert len({a.json()["runId"] for a in answers}) == 1
    done = wait_status(c, task["id"], "done")
    kinds = types_of(c, task["id"])
    assert kinds.count("task.started") == 1 and kinds.count("task.completed") == 1
    assert c.get(f"/tasks/{task['id']}/output").text == "one run" == done["result"]


# --- bad input: 400, 413, 415, and the log untouched -------------------------------------------

DEEP: dict = {}
_level = DEEP
for _ in range(40):
    _level["x"] = {}
    _level = _level["x"]

BAD_CREATE = [
    (b'{"type": "prompt", "content": ', "malformed_json", ()),
    (b'{"type": "prompt" "content": "x"}', "malformed_json", ()),
    (b'{"type": "prompt", "content": "\xff"}', "malformed_json", ()),  # not UTF-8
    (b'{"type": "prompt", "content": "\\ud800"}', "malformed_json", ()),  # a lone surrogate
    (b"[]", None, ("object",)),
    (b"null", None, ("object",)),
    ({"type": "prompt"}, None, ("content",)),
    ({"content": "x"}, None, ("type",)),
    ({"type": "essay", "content": "x"}, None, ("type",)),
    ({"type": "prompt", "content": 5}, None, ("content",)),
    ({"type": "prompt", "content": ""}, None, ("content",)),
    ({"type": "prompt", "content": "x", "priority": 0}, None, ("priority",)),
    ({"type": "prompt", "content": "x", "priority": 11}, None, ("priority",)),
    ({"type": "prompt", "content": "x", "priority": "5"}, None, ("priority",)),
    ({"type": "prompt", "content": "x", "priority": 5.5}, None, ("priority",)),
    ({"type": "prompt", "content": "x", "requiresApproval": "yes"}, None, ("requiresApproval",)),
    ({"type": "prompt", "content": "x", "agentId": "agent-7"}, None, ("agentId",)),
    ({"type": "prompt", "content": "x", "projectId": "12345"}, None, ("projectId",)),
    ({"type": "prompt", "content": "x", "dependsOn": ["nope"]}, None, ("dependsOn",)),
    ({"type": "prompt", "content": "x", "dependsOn": "nope"}, None, ("dependsOn",)),
    ({"type": "prompt", "content": "x", "metadata": []}, None, ("metadata",)),
    ({"type": "prompt", "content": "x", "metadata": {"ratio": 0.5}}, None, ("metadata",)),
    ({"type": "prompt", "content": "x", "metadata": DEEP}, None, ("nested",)),
    ({"type": "prompt", "content": "x", "timeoutSeconds": 0}, None, ("timeoutSeconds",)),
    ({"type": "prompt", "content": "x", "webhookUrl": "not a url"}, None, ("webhookUrl",)),
    ({"type": "prompt", "content": "x", "webhookUrl": "http://xn--zz.com/hook"}, None, ("webhookUrl",)),  # bad IDNA
    ({"type": "prompt", "content": "x", "desktopId": 7}, None, ("desktopId",)),
    ({"type": "prompt", "content": "x", "colour": "blue"}, None, ("colour",)),
    ({"type": "prompt", "content": "x\u0000y"}, None, ("content",)),
]


@pytest.mark.parametrize("body, code, mentions", BAD_CREATE)
def test_create_refuses_bad_bodies(c, body, code, mentions):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with log_unchanged(c):
        refused(c.post("/tasks", content=raw, headers={"Content-Type": "application/json"}), 400, code, mentions)


def test_create_refuses_unknown_references(c):
    with log_unchanged(c):
        refused(c.post("/tasks", json={"type": "prompt", "content": "x", "agentId": str(uuid.uuid4())}), 404)
        refused(c.post("/tasks", json={"type": "prompt", "content": "x", "projectId": str(uuid.uuid4())}), 404)
        refused(c.post("/tasks", json={"type": "prompt", "content": "x", "dependsOn": [str(uuid.uuid4())]}), 404)


TASK_ID = "{task}"

BAD_COMMAND_BODIES = [
    ("PATCH", "", {"priority": 11}, ("priority",)),
    ("PATCH", "", {"content": None}, ("content",)),
    ("PATCH", "", {"status": "done"}, ("status",)),
    ("PATCH", "", {"archived": "yes"}, ("archived",)),
    ("PATCH", "", {"metadata": {"deep": 1.25}}, ("metadata",)),
    ("POST", "/run", {"agentId": "echo"}, ("agentId",)),
    ("POST", "/run", {"agent_id": "echo"}, ("agent_id",)),
    ("POST", "/run", {"agent": ECHO_AGENT_ID}, ("agent",)),
    ("POST", "/cancel", {"reason": 5}, ("reason",)),
    ("POST", "/messages", {}, ("message",)),
    ("POST", "/messages", {"message": ["hi"]}, ("message",)),
    ("POST", "/review", {"decision": "maybe"}, ("decision",)),
    ("POST", "/review", {"feedback": "no decision"}, ("decision",)),
    ("POST", "/presence", {}, ("deviceId",)),
    ("POST", "/presence", {"deviceId": ""}, ("deviceId",)),
    ("DELETE", "/presence", {"device": "x"}, ("device",)),
]


@pytest.fixture(scope="module")
def pending(c):
    return create(c, content="target of bad requests")


@pytest.mark.parametrize("method, suffix, body, mentions", BAD_COMMAND_BODIES)
def test_task_commands_refuse_bad_bodies(c, pending, method, suffix, body, mentions):
    path = f"/tasks/{pending['id']}{suffix}"
    with log_unchanged(c):
        refused(c.request(method, path, json=body), 400, None, mentions)
        malformed = c.request(method, path, content=b"{nope", headers={"Content-Type": "application/json"})
        refused(malformed, 400, "malformed_json")
        refused(c.request(method, path, content=json.dumps(body), headers={"Content-Type": "text/plain"}), 415)
    assert get(c, pending["id"])["version"] == pending["version"]


def test_resolve_refuses_bad_bodies(c):
    task = finished(c, "review")
    path = f"/approvals/{task['approvalId']}/resolve"
    with log_unchanged(c):
        refused(c.post(path, json={"decision": "perhaps"}), 400, None, ("decision",))
        refused(c.post(path, json={}), 400, None, ("decision",))
        refused(c.post(path, content=b"{", headers={"Content-Type": "application/json"}), 400, "malformed_json")
        refused(c.post(path, content=b'{"decision": "approve"}', headers={"Content-Type": "text/plain"}), 415)
        refused(c.post(path), 400)
    assert c.post(path, json={"decision": "approve"}).status_code == 200


def test_wrong_content_type_is_415(c):
    body = json.dumps({"type": "prompt", "content": "x"}).encode()
    with log_unchanged(c):
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/jsonp", None):
            headers = {"Content-Type": content_type} if content_type else {}  # raw content: httpx sets none
            refused(c.post("/tasks", content=body, headers=headers), 415, "unsupported_media_type")
    # a charset parameter is still JSON
    with_charset = {"Content-Type": "application/json; charset=utf-8"}
    assert c.post("/tasks", content=body, headers=with_charset).status_code == 201


def test_oversized_bodies_are_413(c, pending):
    big = json.dumps({"type": "prompt", "content": "x" * (MiB + 1)}).encode()
    with log_unchanged(c):
        refused(c.post("/tasks", content=big, headers={"Content-Type": "application/json"}), 413, "body_too_large")
        # without a Content-Length (chunked), the limit holds while reading
        chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
        refused(c.post("/tasks", content=chunks, headers={"Content-Type": "application/json"}), 413, "body_too_large")
        patch = json.dumps({"title": "t" * (MiB + 1)}).encode()
        refused(c.patch(f"/tasks/{pending['id']}", content=patch, headers={"Content-Type": "application/json"}), 413)
    # just under the limit is not refused for its size
    fits = json.dumps({"type": "prompt", "content": "x" * (200 * 1024)}).encode()
    assert c.post("/tasks", content=fits, headers={"Content-Type": "application/json"}).status_code == 201


BAD_QUERIES = [
    ("/tasks", {"limit": 0}, "limit"),
    ("/tasks", {"limit": 501}, "limit"),
    ("/tasks", {"limit": "ten"}, "limit"),
    ("/tasks", {"limit": "1e3"}, "limit"),
    ("/tasks", {"offset": -1}, "offset"),
    ("/tasks", {"offset": "x"}, "offset"),
    ("/tasks", {"offset": "99999999999999999999999"}, "offset"),
    ("/tasks", {"status": "finished"}, "status"),
    ("/tasks", {"status": "pending,finished"}, "status"),
    ("/tasks", {"archived": "maybe"}, "archived"),
    ("/tasks", {"agentId": "echo"}, "agentId"),
    ("/tasks", {"projectId": "p1"}, "projectId"),
    ("/tasks/{task}", {"asOf": "yesterday"}, "asOf"),
    ("/tasks/{task}", {"asOf": -1}, "asOf"),
    ("/tasks/{task}", {"asOf": "99999999999999999999999"}, "asOf"),
    ("/tasks/{task}/events", {"after": -1}, "after"),
    ("/tasks/{task}/events", {"after": "99999999999999999999999"}, "after"),
    ("/tasks/{task}/events", {"limit": 0}, "limit"),
    ("/tasks/{task}/events", {"limit": 5001}, "limit"),
    ("/tasks/{task}/output", {"runId": "latest"}, "runId"),
    ("/approvals", {"status": "open"}, "status"),
    ("/events", {"after": "x"}, "after"),
    ("/events", {"after": "99999999999999999999999"}, "after"),
    ("/events", {"limit": 0}, "limit"),
    ("/events", {"limit": 5001}, "limit"),
    ("/events", {"types": ","}, "types"),
]


@pytest.mark.parametrize("path, params, name", BAD_QUERIES)
def test_bad_query_parameters_are_400(c, pending, path, params, name):
    with log_unchanged(c):
        refused(c.get(path.replace("{task}", pending["id"]), params=params), 400, None, (name,))


TASK_ROUTES = [
    ("GET", "", None), ("PATCH", "", {"title": "x"}), ("DELETE", "", None),
    ("POST", "/run", None), ("POST", "/cancel", None), ("POST", "/retry", None),
    ("POST", "/messages", {"message": "hi"}), ("POST", "/review", {"decision": "approve"}),
    ("POST", "/presence", {"deviceId": "d"}), ("DELETE", "/presence", {"deviceId": "d"}),
    ("GET", "/events", None), ("GET", "/output", None),
]


@pytest.mark.parametrize("method, suffix, body", TASK_ROUTES)
def test_task_routes_refuse_bad_uuids_and_unknown_tasks(c, method, suffix, body):
    with log_unchanged(c):
        for bad in ("not-a-uuid", "1234", "0" * 40):
            refused(c.request(method, f"/tasks/{bad}{suffix}", json=body), 400, "invalid_uuid", ("task",))
        refused(c.request(method, f"/tasks/{uuid.uuid4()}{suffix}", json=body), 404, "not_found")


def test_approval_routes_refuse_bad_uuids_and_unknown_approvals(c):
    with log_unchanged(c):
        refused(c.get("/approvals/nope"), 400, "invalid_uuid")
        refused(c.post("/approvals/nope/resolve", json={"decision": "approve"}), 400, "invalid_uuid")
        refused(c.get(f"/approvals/{uuid.uuid4()}"), 404, "not_found")
        refused(c.post(f"/approvals/{uuid.uuid4()}/resolve", json={"decision": "approve"}), 404, "not_found")


def test_a_client_leaving_mid_body_is_no_server_error(server):
    """On a real server: the client is a raw socket that closes half way through its body."""
    with log_unchanged(server.client()):
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(
                b"POST /api/mission-control/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer " + server.admin_token.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"type": "prompt", '
            )

        def answered() -> list[dict]:
            lines = (json.loads(x) for x in server.output().splitlines() if x.startswith("{"))
            return [x for x in lines if x.get("route") == "create_task" and x.get("status") == 499]

        wait_for(answered, what="the access log line of the abandoned request")
    no_unhandled_errors(server)


def test_unknown_routes_and_methods(c):
    refused(c.get("/nothing-here"), 404)
    refused(c.put("/tasks", json={}), 405)


# --- authentication and scopes ----------------------------------------------------------------


def test_401_without_a_valid_key(c, api_server):
    body = {"type": "prompt", "content": "x"}
    with log_unchanged(c):
        for client in (api_server.client(""), api_server.client("mc_not-a-real-key")):
            for response in (client.get("/tasks"), client.post("/tasks", json=body), client.get("/overview")):
                refused(response, 401, "unauthorized")
                assert response.headers["www-authenticate"].startswith("Bearer")
    issued = cli(api_server.data_dir, "token", "create", "--user", "revokee", "--scopes", "task:read").stdout
    key_id, token = issued.split()[1], issued.strip().splitlines()[-1]
    revokee = api_server.client(token)
    assert revokee.get("/tasks").status_code == 200
    cli(api_server.data_dir, "token", "revoke", key_id)
    refused(refused_once_revoked(lambda: revokee.get("/tasks")), 401, "unauthorized", ("revoked",))


def test_403_without_the_scope(c, api_server, pending):
    reader = api_server.client(api_server.token("reader", "task:read"))
    assert reader.get("/tasks").status_code == 200
    with log_unchanged(c):
        refused(reader.post("/tasks", json={"type": "prompt", "content": "x"}), 403, "forbidden", ("task:write",))
        refused(reader.get("/events"), 403, "forbidden", ("audit:read",))
    writer = api_server.client(api_server.token("writer", "task:read,task:write"))
    task = writer.post("/tasks", json={"type": "prompt", "content": "x", "requiresApproval": True}).json()
    assert writer.post(f"/tasks/{task['id']}/run").status_code == 200
    wait_status(c, task["id"], "review")
    with log_unchanged(c):
        refused(writer.post(f"/tasks/{task['id']}/review", json={"decision": "approve"}), 403, "forbidden")
        approval_id = get(c, task["id"])["approvalId"]
        refused(writer.post(f"/approvals/{approval_id}/resolve", json={"decision": "approve"}), 403)
    # outside the caller's projects a task does not exist
    with log_unchanged(c):
        refused(writer.get(f"/tasks/{pending['id']}"), 404, "not_found")
    assert c.post(f"/tasks/{task['id']}/review", json={"decision": "approve"}).status_code == 200


# --- the log and the overview -----------------------------------------------------------------


def test_events_json_paging_and_ndjson(c, api_server):
    finished(c, "done")
    everything, log_head = read_log(c)
    assert [e.position for e in everything] == list(range(1, log_head + 1))

    first = c.get("/events", params={"limit": 3}).json()
    assert [e["position"] for e in first["events"]] == [1, 2, 3] and first["next"] == 3
    assert first["head"] >= log_head
    second = c.get("/events", params={"after": first["next"], "limit": 3}).json()
    assert [e["position"] for e in second["events"]] == [4, 5, 6]
    end = c.get("/events", params={"after": log_head}).json()
    assert end["events"] == [] or end["events"][0]["position"] == log_head + 1

    only = c.get("/events", params={"types": "task.created,approval.", "limit": 5000}).json()["events"]
    assert only and {e["type"] for e in only} <= {"task.created", "approval.created", "approval.resolved"}
    assert {e["type"] for e in only} >= {"task.created", "approval.created"}
    prefixed = c.get("/events", params={"types": "task.*", "limit": 5000}).json()["events"]
    assert prefixed and all(e["type"].startswith("task.") for e in prefixed)
    stream = everything[-1].stream
    in_stream = c.get("/events", params={"stream": stream, "limit": 5000}).json()["events"]
    assert [e["version"] for e in in_stream] == list(range(1, len(in_stream) + 1))

    response = c.get("/events", headers={"Accept": "application/x-ndjson"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[: len(everything)] == [as_json(e) for e in everything]
    typed_lines = c.get("/events", params={"types": "task.*", "after": 3}, headers={"Accept": "application/x-ndjson"})
    filtered = [json.loads(x) for x in typed_lines.text.splitlines()]
    assert filtered and all(e["type"].startswith("task.") and e["position"] > 3 for e in filtered)


def test_events_include_what_the_cli_appended(c, api_server):
    """The CLI appends to the same log from another process: GET /events shows it at once."""
    before = head(c)
    cli(api_server.data_dir, "token", "create", "--user", f"cli-{uuid.uuid4().hex[:6]}", "--scopes", "task:read")
    page = c.get("/events", params={"after": before}).json()
    assert "apikey.issued" in [e["type"] for e in page["events"]]
    assert page["head"] == page["events"][-1]["position"]
    ndjson = c.get("/events", params={"after": before}, headers={"Accept": "application/x-ndjson"})
    assert [json.loads(x)["position"] for x in ndjson.text.splitlines()] == [e["position"] for e in page["events"]]


def test_overview_counts_tasks_and_desktops(c):
    with in_status(c, "running", desktopId="local"), in_status(c, "running"):
        overview = c.get("/overview")
        assert overview.status_code == 200
        figures = overview.json()
        assert set(figures) == {
            "tasks", "activeDesktops", "activeAgents", "approvalsPending", "maxConcurrent", "resources", "log", "usage",
        }
        assert set(figures["usage"]) == {"promptTokens", "completionTokens", "costUsd", "unpricedRuns"}
        assert figures["maxConcurrent"] == 5 and figures["activeAgents"] >= 1
        assert figures["activeDesktops"] >= 1 and figures["tasks"]["running"] >= 2
        assert set(figures["resources"]["memory"]) == {"used", "total", "percent"}
        assert figures["log"]["head"] == head(c) and figures["log"]["streams"] > 0
        # the counters equal counting the tasks, status by status
        for status, count in figures["tasks"].items():
            listed = c.get("/tasks", params={"status": status, "archived": "all", "limit": 1})
            assert int(listed.headers["x-total-count"]) == count, status
        desktops = figures["activeDesktops"]
    after = c.get("/overview").json()
    assert after["activeDesktops"] == desktops  # desktops online, busy or idle: the node's own among them
    pending = c.get("/approvals").json()
    assert after["approvalsPending"] == len(pending)
    statuses = Counter(x["status"] for x in c.get("/tasks", params={"archived": "all", "limit": 500}).json())
    if sum(after["tasks"].values()) <= 500:
        assert {s: n for s, n in after["tasks"].items() if n} == dict(statuses)
