"""Devices and notifications against real receivers on loopback: who is told (a watcher's devices,
unless one of them is watching live), how (signed webhook POSTs, Slack bodies, a browser's
`notification.sent` seen by its user alone), and that a receiver that is down is told once it is
back, under the delivery id it was first tried with, across retries and a restart."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api_helpers import device, log_unchanged, refused, stream_until, wait_for
from tests.server import Server
from tests.test_security import key_id
from tests.test_webhooks import SETTINGS, receiving, signed

USER_SCOPES = "task:read,task:write,approval:write"


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("notifications") / "data", SETTINGS).start()
    yield s
    s.stop()


@pytest.fixture
def receiver():
    with receiving() as r:
        yield r


@pytest.fixture(scope="module")
def fay(mc):
    return user(mc, "fay")


def user(server: Server, name: str) -> httpx.Client:
    token = server.token(name, USER_SCOPES)
    key_id(server, token)  # the server has folded the CLI's append before a test takes the log's head
    return server.client(token)


def in_review(client: httpx.Client, title: str) -> dict:
    task = client.post("/tasks", json={"type": "prompt", "content": "x", "title": title, "requiresApproval": True})
    assert task.status_code == 201, task.text
    assert client.post(f"/tasks/{task.json()['id']}/run").status_code == 200
    return wait_for(lambda: (t := client.get(f"/tasks/{task.json()['id']}").json())["status"] == "review" and t,
                    what="the task in review")


def told(admin: httpx.Client, user_id: str, types: str = "notification.sent") -> list[dict]:
    """What the log records of the user's notifications."""
    page = admin.get("/events", params={"stream": f"devices-{user_id}", "types": types, "limit": 5000})
    assert page.status_code == 200, page.text
    return [e["payload"] for e in page.json()["events"]]


# --- devices ------------------------------------------------------------------------------------


def test_devices_are_registered_listed_changed_and_removed_per_user(mc, receiver):
    dee, eve, admin = user(mc, "dee"), user(mc, "eve"), mc.client()
    hook = {"deviceId": "laptop", "kind": "webhook", "url": receiver.url + "/dee"}
    created = dee.post("/devices", json=hook)
    assert created.status_code == 201, created.text
    assert created.json() | {"createdAt": None} == {
        **hook, "events": ["task.review", "task.input_requested", "task.failed", "task.completed"], "createdAt": None}
    with log_unchanged(admin):  # the same registration again: 200, nothing to record
        assert dee.post("/devices", json=hook).json() == created.json()
    narrowed = dee.post("/devices", json={**hook, "events": ["task.failed"]})
    assert narrowed.status_code == 200 and narrowed.json()["events"] == ["task.failed"]
    assert narrowed.json()["createdAt"] == created.json()["createdAt"]
    device(dee, "tab")
    assert [d["deviceId"] for d in dee.get("/devices").json()] == ["laptop", "tab"]
    assert dee.get("/devices").json()[1] | {"createdAt": None} == {
        "deviceId": "tab", "kind": "browser", "url": None, "createdAt": None,
        "events": ["task.review", "task.input_requested", "task.failed", "task.completed"]}

    # One user's device ids are theirs: Eve sees none of Dee's, and may use the same id.
    assert eve.get("/devices").json() == []
    with log_unchanged(admin):
        refused(eve.delete("/devices/laptop"), 404, "not_found", ("laptop",))
    assert eve.post("/devices", json={"deviceId": "laptop", "kind": "browser"}).status_code == 201
    assert dee.delete("/devices/laptop").status_code == 204
    assert [d["deviceId"] for d in dee.get("/devices").json()] == ["tab"]
    assert [d["kind"] for d in eve.get("/devices").json()] == ["browser"]
    with log_unchanged(admin):
        refused(dee.delete("/devices/laptop"), 404, "not_found")
    stream = admin.get("/events", params={"stream": "devices-dee"}).json()["events"]
    assert [e["type"] for e in stream] == ["device.registered"] * 3 + ["device.removed"]
    assert {e["meta"]["actor"] for e in stream} == {"dee"}


@pytest.mark.parametrize("body, mentions", [
    ({"kind": "browser", "url": "http://127.0.0.1:9/x"}, ("browser", "url")),
    ({"kind": "webhook"}, ("webhook", "url")),
    ({"kind": "slack"}, ("slack", "url")),
    ({"kind": "webhook", "url": "http://169.254.169.254/latest"}, ("link-local",)),
    ({"kind": "slack", "url": "http://10.0.0.1/hook"}, ("MC_WEBHOOK_ALLOW",)),
    ({"kind": "webhook", "url": "http://me:secret@127.0.0.1/x"}, ("credentials",)),
    ({"kind": "webhook", "url": "ftp://127.0.0.1/x"}, ("url",)),
    ({"kind": "browser", "events": ["task.cancelled"]}, ("events",)),
    ({"kind": "browser", "events": []}, ("events",)),
    ({"kind": "browser", "events": ["task.failed", "task.failed"]}, ("more than once",)),
    ({"kind": "phone"}, ("kind",)),
    ({"kind": "browser", "deviceId": ""}, ("deviceId",)),
])
def test_a_bad_registration_is_a_400_that_says_why_and_records_nothing(mc, fay, body, mentions):
    with log_unchanged(mc.client()):
        refused(fay.post("/devices", json={"deviceId": "d", **body}), 400, None, mentions)
    assert fay.get("/devices").json() == []


def test_presence_is_marked_from_a_registered_device_only(mc):
    gus, admin = user(mc, "gus"), mc.client()
    task = gus.post("/tasks", json={"type": "prompt", "content": "x"}).json()
    with log_unchanged(admin):
        refused(gus.post(f"/tasks/{task['id']}/presence", json={"deviceId": "tab"}), 404, "not_found", ("POST /devices",))
    device(gus, "tab")
    assert gus.post(f"/tasks/{task['id']}/presence", json={"deviceId": "tab"}).status_code == 204


# --- who is told ----------------------------------------------------------------------------------


def test_presence_on_one_device_keeps_all_of_its_users_devices_quiet_until_it_ends(mc, receiver):
    ann, bob, admin = user(mc, "ann"), user(mc, "bob"), mc.client()
    device(ann, "hook", kind="webhook", url=receiver.url + "/ann")
    device(ann, "chat", kind="slack", url=receiver.url + "/ann-slack")
    device(ann, "tab")
    device(bob, "hook", kind="webhook", url=receiver.url + "/bob")  # Bob watches none of Ann's tasks
    task = ann.post("/tasks", json={"type": "prompt", "content": "x", "title": "Quarterly report",
                                    "requiresApproval": True}).json()
    assert ann.post(f"/tasks/{task['id']}/presence", json={"deviceId": "tab"}).status_code == 204
    assert ann.post(f"/tasks/{task['id']}/run").status_code == 200
    wait_for(lambda: ann.get(f"/tasks/{task['id']}").json()["status"] == "review", what="review")

    # Ann watches it on her tab: the review tells none of her devices. Her tab leaves; the decision
    # that comes next (approved, done) reaches every one of them.
    assert ann.delete(f"/tasks/{task['id']}/presence", params={"deviceId": "tab"}).status_code == 204
    assert ann.post(f"/tasks/{task['id']}/review", json={"decision": "approve"}).status_code == 200
    sent = wait_for(lambda: len(found := told(admin, "ann")) == 3 and found, what="three devices told")
    assert {(s["deviceId"], s["cause"]["type"], s["taskId"]) for s in sent} == {
        (name, "task.completed", task["id"]) for name in ("hook", "chat", "tab")}
    assert len({s["deliveryId"] for s in sent}) == 3
    (hook,) = receiver.got("/ann")
    assert signed(hook) and hook.headers["X-MC-Event"] == "task.completed"
    body = json.loads(hook.body)
    assert hook.headers["X-MC-Delivery"] == body["deliveryId"] == next(s["deliveryId"] for s in sent if s["deviceId"] == "hook")
    assert (body["deviceId"], body["taskId"], body["task"]["status"]) == ("hook", task["id"], "done")
    assert "Quarterly report" in body["text"]
    (slack,) = receiver.got("/ann-slack")
    assert list(json.loads(slack.body)) == ["text"] and "Quarterly report" in json.loads(slack.body)["text"]
    assert told(admin, "ann", "notification.failed") == [] and receiver.got("/bob") == []
    assert told(admin, "bob") == []


def test_a_live_mark_silences_that_task_alone_and_each_device_hears_what_it_asked_for(mc, receiver):
    """(A mark that lapsed silences nothing: tests/test_readmodels_contract.py, with a short ttl.)"""
    cy, admin = user(mc, "cy"), mc.client()
    device(cy, "hook", kind="webhook", url=receiver.url + "/cy", events=["task.failed", "task.review"])
    device(cy, "tab")
    quiet, loud = (in_review(cy, name) for name in ("quiet", "loud"))
    assert cy.post(f"/tasks/{quiet['id']}/presence", json={"deviceId": "tab"}).status_code == 204
    for task in (quiet, loud):  # rejected: failed
        assert cy.post(f"/tasks/{task['id']}/review", json={"decision": "reject"}).status_code == 200
    # Both reviews told both devices (no presence then); only the loud task's failure tells them again.
    wait_for(lambda: len(told(admin, "cy")) == 6, what="six notifications")
    sent = told(admin, "cy")
    assert sorted((s["taskId"], s["cause"]["type"]) for s in sent if s["deviceId"] == "hook") == sorted([
        (quiet["id"], "task.review"), (loud["id"], "task.review"), (loud["id"], "task.failed")])
    assert [s["cause"]["type"] for s in sent if s["deviceId"] == "tab" and s["taskId"] == quiet["id"]] == ["task.review"]


def test_a_browser_notification_is_on_its_users_stream_alone(mc):
    ida, jo = user(mc, "ida"), user(mc, "jo")
    device(ida, "tab")
    device(jo, "tab")
    task = ida.post("/tasks", json={"type": "prompt", "content": "x", "title": "For Ida"}).json()
    assert ida.post(f"/tasks/{task['id']}/run").status_code == 200
    wait_for(lambda: told(mc.client(), "ida"), what="Ida's tab told")

    def sentinel(client: httpx.Client, text: str):
        return lambda: client.post("/tasks", json={"type": "prompt", "content": text}).raise_for_status()

    hers = stream_until(ida, "ida's end", sentinel(ida, "ida's end"))
    (note,) = [e for e in hers if e["type"] == "notification.sent"]
    assert note["stream"] == "devices-ida" and note["payload"]["deviceId"] == "tab"
    assert "For Ida" in note["payload"]["text"] and note["payload"]["taskId"] == task["id"]
    for other in (jo, mc.client()):  # another user, and an admin, see nobody's devices but their own
        theirs = stream_until(other, f"end {id(other)}", sentinel(jo, f"end {id(other)}"))
        assert not [e for e in theirs if e["stream"] == "devices-ida"]
    assert [e for e in stream_until(jo, "jo's end", sentinel(jo, "jo's end")) if e["stream"] == "devices-jo"]


# --- delivery -----------------------------------------------------------------------------------


def test_a_receiver_that_is_down_is_told_once_back_under_one_delivery_id(mc, receiver):
    kim, admin = user(mc, "kim"), mc.client()
    receiver.fail_first["/kim"] = 2
    device(kim, "hook", kind="webhook", url=receiver.url + "/kim", events=["task.review"])
    in_review(kim, "retried")
    requests = wait_for(lambda: len(got := receiver.got("/kim")) == 3 and got, what="three attempts")
    assert len({r.headers["X-MC-Delivery"] for r in requests}) == 1 and all(signed(r) for r in requests)
    (sent,) = wait_for(lambda: told(admin, "kim"), what="the delivery recorded")
    failed = told(admin, "kim", "notification.failed")
    assert [f["attempt"] for f in failed] == [1, 2] and not any(f["final"] for f in failed)
    assert "HTTP 500" in failed[0]["error"]
    assert (sent["attempt"], sent["deliveryId"]) == (3, requests[0].headers["X-MC-Delivery"])
    assert {f["deliveryId"] for f in failed} == {sent["deliveryId"]}


def test_a_restart_resumes_a_pending_notification_under_the_same_delivery_id(tmp_path, receiver):
    with Server(tmp_path / "data", SETTINGS).start() as server:
        lee, admin = user(server, "lee"), server.client()
        receiver.failing.add("/lee")
        device(lee, "hook", kind="webhook", url=receiver.url + "/lee", events=["task.review"])
        in_review(lee, "across a restart")
        wait_for(lambda: told(admin, "lee", "notification.failed"), what="a failed attempt recorded")
        server.stop()
        receiver.failing.discard("/lee")
        server.start()
        admin = server.client()
        (sent,) = wait_for(lambda: told(admin, "lee"), what="the delivery resumed after the restart")
        failed = told(admin, "lee", "notification.failed")
        assert failed and {f["deliveryId"] for f in failed} == {sent["deliveryId"]}
        assert sent["attempt"] == failed[-1]["attempt"] + 1
        assert {r.headers["X-MC-Delivery"] for r in receiver.got("/lee")} == {sent["deliveryId"]}
        assert receiver.got("/lee")[-1].headers["X-MC-Delivery"] == sent["deliveryId"]
