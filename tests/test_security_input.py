"""Hostile input on every route: each is a clear 4xx, never a 5xx; nothing is appended; the
server keeps answering. Strings that merely look dangerous (SQL, unicode oddities) are data:
stored and returned verbatim, and matched literally."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest

from tests.api_helpers import head, log_unchanged, read_log, refused, wait_for
from tests.chain_audit import audit
from tests.server import API
from tests.test_security import endpoints, key_id, status_of

SQL = [
    "'; DROP TABLE tasks; --", '" OR "1"="1', "' OR 1=1 --", "1; SELECT * FROM apikeys", "%", "_",
    "\\", "' UNION SELECT token_hash FROM apikeys --", "*/ /*", "`id`", "[events]",
]
UNICODE = [
    "\u202eRTL override\u202c", "שלום עולם", "emoji 👩‍👩‍👧‍👦 🏳️‍🌈", "e\u0301\u0301\u0301 combining",
    "line\u2028sep\u2029",
    "\ufeffBOM", "noncharacter \uffff \U0010ffff", "zero\u200bwidth", "ＦＵＬＬ",
]
BAD_IDS = ["not-a-uuid", "' OR '1'='1", "1;DROP TABLE tasks", "%00", "%ED%A0%80", "%ff",
           "00000000-0000-0000-0000-00000000000g", "\u202e" + "0" * 32, "a" * 1000]
BAD_NAMES = ["Not-A-Name", "-first", "' OR '1'='1", "1;DROP TABLE tasks", "%00", "%ED%A0%80", "%ff",
             "\u202e" + "0" * 32, "a" * 64]


def _ten_megabytes() -> Iterator[bytes]:
    for _ in range(10):
        yield b" " * (1 << 20)


JSON = {"Content-Type": "application/json"}
HOSTILE_BODIES = {
    "10 MB with Content-Length": dict(content=b" " * (10 << 20), headers=JSON),
    "10 MB chunked": dict(content=_ten_megabytes, headers=JSON),
    "100k nested arrays": dict(content=b"[" * 100_000 + b"]" * 100_000, headers=JSON),
    "100k nested objects": dict(content=b'{"a":' * 100_000 + b"1" + b"}" * 100_000, headers=JSON),
    "a lone surrogate": dict(content=b'{"title": "\\ud800"}', headers=JSON),
    "a reversed surrogate pair": dict(content=b'{"title": "\\udc00\\ud800"}', headers=JSON),
    "invalid UTF-8": dict(content=b'{"title": "\xff\xfe"}', headers=JSON),
    "overlong UTF-8 NUL": dict(content=b'{"title": "\xc0\x80"}', headers=JSON),
    "truncated JSON": dict(content=b'{"title": ', headers=JSON),
    "not JSON at all": dict(content=b"title=x", headers={"Content-Type": "application/x-www-form-urlencoded"}),
    "JSON as text/plain": dict(content=b"{}", headers={"Content-Type": "text/plain"}),
    "a bare array": dict(content=b"[]", headers=JSON),
    "an unknown field": dict(content=b'{"dropTable": "tasks"}', headers=JSON),
}


@pytest.fixture(scope="module")
def ids(shared_app_server):
    """A real thing of each kind, so that hostile requests reach the body and query parsing."""
    admin = shared_app_server.client()
    task = admin.post("/tasks", json={"type": "prompt", "content": "target"}).json()["id"]
    review = admin.post("/tasks", json={"type": "prompt", "content": "r", "requiresApproval": True}).json()["id"]
    admin.post(f"/tasks/{review}/run")
    wait_for(lambda: admin.get(f"/tasks/{review}").json()["status"] == "review", what="review")
    return SimpleNamespace(
        task_id=task,
        approval_id=next(a["id"] for a in admin.get("/approvals").json() if a["taskId"] == review),
        agent_id=admin.post("/agents", json={"name": "target", "kind": "echo"}).json()["id"],
        project_id=admin.post("/projects", json={"name": "target"}).json()["id"],
        desktop_id="local",
        device_id="hostile-target",
        run_id=str(uuid.uuid4()),
    )


def filled(path: str, ids: SimpleNamespace, **override: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: override.get(m[1], getattr(ids, m[1], m[1])), path)


def url_of(server, template: str, ids: SimpleNamespace, **override: str) -> str:
    """A registered route's path (it includes the API prefix) as an absolute URL."""
    return server.base_url + filled(template, ids, **override)


def api_endpoints(methods: set[str]) -> list[tuple[str, str]]:
    return [(m, p) for m, p in endpoints() if m in methods and p.startswith("/api/")]


@pytest.fixture
def admin(shared_app_server) -> httpx.Client:
    """An admin key of the test's own: hundreds of requests a second would drain a shared one's bucket."""
    token = shared_app_server.token("hostile-admin", "admin")
    key_id(shared_app_server, token)  # the server has seen the CLI's appends before a test takes the head
    return shared_app_server.client(token)


@pytest.fixture
def caller(shared_app_server, admin, ids):
    """The client for a route: the admin's, or for a worker route a worker key's, with a lease of the
    right form (a worker route refuses every other key before it reads anything)."""
    token = shared_app_server.token("hostile-worker", "worker", desktop="hostile-box")
    key_id(shared_app_server, token)
    worker = shared_app_server.client(token)
    worker.headers["MC-Lease"] = f"{ids.run_id}:1"
    return lambda template: worker if template.startswith(API + "/worker/") else admin


def test_hostile_bodies_on_every_route_that_changes_something(shared_app_server, ids, admin, caller):
    with log_unchanged(admin):
        for method, template in api_endpoints({"POST", "PATCH", "DELETE"}):
            url = url_of(shared_app_server, template, ids)
            for what, options in HOSTILE_BODIES.items():
                content = options["content"]
                response = caller(template).request(method, url, content=content() if callable(content) else content,
                                                    headers=options["headers"])
                assert 400 <= response.status_code < 500, f"{method} {template} with {what}: {response.status_code}"
                if what.startswith("10 MB"):
                    refused(response, 413, "body_too_large")
                elif "text/plain" in what or "not JSON" in what:
                    refused(response, 415, "unsupported_media_type")
                else:
                    refused(response, 400)
    assert shared_app_server.http().get("/healthz").status_code == 200


def test_invalid_uuids_in_every_path_parameter(shared_app_server, ids, admin, caller):
    with log_unchanged(admin):
        for method, template in api_endpoints({"GET", "POST", "PATCH", "DELETE"}):
            for name in re.findall(r"\{(\w+_id)\}", template):
                if name == "device_id":
                    continue  # any label the client chose (tests/test_notifications.py)
                named = name == "desktop_id"  # a desktop's id is its name
                for bad in BAD_NAMES if named else BAD_IDS:
                    url = url_of(shared_app_server, template, ids, **{name: bad})
                    response = status_of(caller(template), method, url)
                    what = f"{method} {template} with {name}={bad[:20]!r}"
                    assert response.status_code == 400, f"{what}: {response.status_code}"
                    assert response.json()["code"] == ("invalid_request" if named else "invalid_uuid"), what
    assert shared_app_server.http().get("/healthz").status_code == 200


def test_sql_metacharacters_and_nul_in_query_parameters(shared_app_server, ids, admin):
    for text in SQL:  # data first: each payload as a title and a desktop label
        response = admin.post("/tasks", json={"type": "command", "content": "c", "title": f"x{text}y",
                                              "desktopId": text})
        assert response.status_code == 201, response.text
    everything = admin.get("/tasks", params={"limit": 500, "archived": "all"}).json()
    # (status, what a 200 must hold) for each query parameter, given a hostile value.
    expect_400 = {
        "/tasks": ["status", "agentId", "projectId", "archived", "limit", "offset"],
        f"/tasks/{ids.task_id}": ["asOf"], f"/tasks/{ids.task_id}/events": ["after", "limit"],
        f"/tasks/{ids.task_id}/output": ["runId"], "/approvals": ["status"], "/events": ["after", "limit"],
        "/activity/stream": ["after", "taskId"],
    }
    with log_unchanged(admin):
        for text in [*SQL, "a\x00b", "\u202e", "\U0001f600", "٣"]:
            for path, names in expect_400.items():
                for name in names:
                    response = status_of(admin, "GET", path, params={name: text})
                    assert response.status_code == 400, f"GET {path}?{name}={text!r}: {response.status_code}"
            # Matched literally (LIKE is case-insensitive for ASCII, and % and _ are no wildcards).
            found = {t["id"] for t in admin.get("/tasks", params={"search": text, "archived": "all",
                                                                  "limit": 500}).json()}
            assert found == {t["id"] for t in everything if text.lower() in f"{t['title']}\n{t['content']}".lower()}
            found = {t["id"] for t in admin.get("/tasks", params={"desktopId": text, "archived": "all"}).json()}
            assert found == {t["id"] for t in everything if t["desktopId"] == text}
            page = admin.get("/events", params={"stream": text})
            assert page.status_code == 200 and page.json()["events"] == []
            assert status_of(admin, "GET", "/activity/stream", params={"stream": text}).status_code == 200
            # a `types` value that names no event type is refused, not matched against nothing
            assert admin.get("/events", params={"types": text}).status_code == 400
            assert status_of(admin, "GET", "/activity/stream", params={"types": text}).status_code == 400
    assert shared_app_server.http().get("/healthz").status_code == 200


def test_sql_metacharacters_and_unicode_in_every_string_field_are_stored_verbatim(shared_app_server, ids, admin):
    for text in SQL + UNICODE:
        metadata = {text: text, "nested": [text, {"k": text}]}
        created = admin.post("/tasks", json={
            "type": "prompt", "content": text, "title": text, "description": text, "desktopId": text,
            "metadata": metadata, "requiresApproval": True,
        })
        assert created.status_code == 201, (text, created.text)
        task = created.json()
        assert (task["content"], task["title"], task["description"], task["desktopId"], task["metadata"]) == (
            text, text, text, text, metadata)
        patched = admin.patch(f"/tasks/{task['id']}", json={"title": text + "!", "metadata": {"m": text}})
        assert patched.json()["title"] == text + "!" and admin.get(f"/tasks/{task['id']}").json() == patched.json()
        assert admin.post("/devices", json={"deviceId": text, "kind": "browser"}).json()["deviceId"] == text
        assert admin.post(f"/tasks/{task['id']}/presence", json={"deviceId": text}).status_code == 204
        assert text in admin.get(f"/tasks/{task['id']}").json()["watchers"]
        agent = admin.post("/agents", json={"name": text, "kind": "echo", "config": {text: text}}).json()
        assert (agent["name"], agent["config"]) == (text, {text: text})
        project = admin.post("/projects", json={"name": text, "context": text, "members": [text]}).json()
        assert (project["name"], project["context"], project["members"]) == (text, text, [text])
    # The prompt, the run's output and the review feedback carry them too (echo writes the prompt back).
    tricky = "".join(SQL + UNICODE)
    task = admin.post("/tasks", json={"type": "prompt", "content": tricky, "requiresApproval": True}).json()
    admin.post(f"/tasks/{task['id']}/run")
    wait_for(lambda: admin.get(f"/tasks/{task['id']}").json()["status"] == "review", what="review")
    assert admin.get(f"/tasks/{task['id']}/output").text == tricky
    reviewed = admin.post(f"/tasks/{task['id']}/review", json={"decision": "reject", "feedback": tricky})
    assert reviewed.status_code == 200 and reviewed.json()["status"] == "failed"
    # The tables are intact and the log still verifies, by the server and by an outside auditor.
    assert admin.get(f"/tasks/{ids.task_id}").status_code == 200
    assert admin.get("/audit/verify").json()["ok"] is True
    events, log_head = read_log(admin)
    assert audit(events) == log_head


def test_nul_characters_in_body_strings_are_refused(shared_app_server, ids, admin):
    nul = "a\u0000b"
    attempts = [
        ("POST", "/tasks", {"type": "prompt", "content": nul}),
        ("POST", "/tasks", {"type": "prompt", "content": "x", "title": nul}),
        ("POST", "/tasks", {"type": "prompt", "content": "x", "metadata": {nul: 1}}),
        ("POST", "/tasks", {"type": "prompt", "content": "x", "metadata": {"k": [nul]}}),
        ("PATCH", "/tasks/{task_id}", {"description": nul}),
        ("POST", "/tasks/{task_id}/presence", {"deviceId": nul}),
        ("POST", "/tasks/{task_id}/cancel", {"reason": nul}),
        ("POST", "/approvals/{approval_id}/resolve", {"decision": "approve", "feedback": nul}),
        ("POST", "/agents", {"name": nul, "kind": "echo"}),
        ("PATCH", "/projects/{project_id}", {"context": nul}),
    ]
    with log_unchanged(admin):
        for method, path, body in attempts:
            refused(admin.request(method, filled(path, ids), json=body), 400, mentions=("NUL",))
    assert head(admin) > 0
