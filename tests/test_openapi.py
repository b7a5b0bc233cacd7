"""GET /openapi.json: one document, generated from the routes and the msgspec types the handlers
use, that covers the whole contract and that the running server keeps: schemathesis throws
generated requests at every operation and finds no server error and no answer outside the schema.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid

import httpx
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from service.http import openapi
from service.http.endpoints import PATH_PARAMS, declaration_of, walk
from service.app import create_app
from service.http.auth import SCOPES
from service.work.local import ECHO_AGENT_ID
from service.settings import Settings
from tests.inprocess import InProcess
from tests.server import API, Server

# Every route of /work/shared/API.md: the document must describe each one.
CONTRACT = [
    ("get", "/tasks"), ("post", "/tasks"), ("get", "/tasks/{task_id}"), ("patch", "/tasks/{task_id}"),
    ("delete", "/tasks/{task_id}"), ("post", "/tasks/{task_id}/run"), ("post", "/tasks/{task_id}/cancel"),
    ("post", "/tasks/{task_id}/retry"), ("post", "/tasks/{task_id}/messages"), ("post", "/tasks/{task_id}/review"),
    ("post", "/tasks/{task_id}/presence"), ("delete", "/tasks/{task_id}/presence"),
    ("get", "/tasks/{task_id}/events"), ("get", "/tasks/{task_id}/output"),
    ("get", "/approvals"), ("post", "/approvals/{approval_id}/resolve"),
    ("get", "/agents"), ("post", "/agents"), ("get", "/agents/{agent_id}"), ("patch", "/agents/{agent_id}"),
    ("post", "/agents/{agent_id}/pause"), ("post", "/agents/{agent_id}/resume"),
    ("get", "/projects"), ("post", "/projects"), ("get", "/projects/{project_id}"),
    ("patch", "/projects/{project_id}"),
    ("get", "/activity/stream"), ("get", "/events"), ("get", "/audit/verify"), ("get", "/overview"), ("get", "/me"),
    ("get", "/tasks/{task_id}/runs"), ("get", "/desktops"), ("get", "/desktops/{desktop_id}"),
    ("post", "/desktops/{desktop_id}/drain"), ("post", "/desktops/{desktop_id}/resume"),
    ("delete", "/desktops/{desktop_id}"),
    ("post", "/devices"), ("get", "/devices"), ("delete", "/devices/{device_id}"),
]
ROOT = [("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"), ("get", "/openapi.json")]

# A valid body for each operation that takes one, so that only the scope can refuse it.
BODIES = {
    "create_task": {"type": "prompt", "content": "scoped"}, "update_task": {"title": "scoped"},
    "run_task": {}, "cancel_task": {}, "send_message": {"message": "hello"},
    "review_task": {"decision": "approve"}, "resolve": {"decision": "approve"},
    "mark_presence": {"deviceId": "scope-test"}, "register_device": {"deviceId": "scope-test", "kind": "browser"}, "clear_presence": {"deviceId": "scope-test"},
    "create_agent": {"name": "scoped", "kind": "echo"}, "update_agent": {"name": "echo"},
    "create_project": {"name": "scoped"}, "update_project": {"context": "scoped"},
    "register": {"sessionId": "scoped", "agents": ["echo"]},
    "poll": {"epoch": 0, "free": 0},  # an epoch long gone once registered: answered at once, not held
    "output": {"chunks": []}, "ask": {"number": 1}, "finish": {"outcome": "done"},
}

FUZZ_ENV = {
    # Generated requests come fast; the rate limit would answer most of them 429 and hide the rest.
    "MC_RATE_LIMIT_PER_SECOND": "100000", "MC_RATE_LIMIT_BURST": "100000",
    "MC_HEARTBEAT_SECONDS": "0.2",
}
CHECKS = {"enabled": False, **{name: {"enabled": True} for name in (
    "not_a_server_error", "response_schema_conformance", "status_code_conformance",
)}}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A real server: schemathesis sends its requests to an address."""
    s = Server(tmp_path_factory.mktemp("openapi") / "data", FUZZ_ENV).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app in this process, for the checks that go route by route."""
    with InProcess(tmp_path_factory.mktemp("openapi-in-process") / "data", FUZZ_ENV).start() as s:
        yield s


@pytest.fixture(scope="module")
def document(app) -> dict:
    answer = app.http().get("/openapi.json")  # no key: the document is public
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    return answer.json()


def operations(document: dict):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_the_document_covers_every_route_of_the_app_and_of_the_contract(document, tmp_path):
    assert document["openapi"].startswith("3.1")
    documented = {(method, path) for path, method, _ in operations(document)}
    app = create_app(Settings(data_dir=str(tmp_path)))
    assert document == msgspec.json.decode(msgspec.json.encode(openapi.build(app.routes)))
    served = {(m.lower(), path) for path, r in walk(app.routes) for m in r.methods - {"HEAD"}}
    assert served <= documented, f"routes missing from the document: {served - documented}"
    expected = {(m, API + p) for m, p in CONTRACT} | set(ROOT)
    assert expected <= documented, f"contract routes missing: {expected - documented}"


def test_the_document_states_the_scope_each_route_enforces(document):
    # One declaration on the handler both refuses the call and writes the document: they cannot differ.
    for path, route in walk(create_app(Settings()).routes):
        declared = declaration_of(route)  # every route is declared (the build also refuses one that is not)
        for method in route.methods - {"HEAD"}:
            security = document["paths"][path][method.lower()]["security"]
            assert security == ([] if declared.scope is None else
                                [{"bearer": [declared.scope]}, *([{"accessToken": [declared.scope]}] if declared.token_in_query else [])]), path


def test_field_docstrings_reach_the_schema(document):
    schemas = document["components"]["schemas"]
    assert schemas["Readiness"]["properties"]["projected"]["description"] == (
        "The log position the read models have folded up to.")
    assert schemas["Task"]["properties"]["watchers"].get("description"), "Task.watchers' docstring is missing"
    # the worker's messages (service/work/wire.py), reached through the answers that hold them
    assert "MC-Lease" in schemas["Assignment"]["properties"]["lease"]["description"]
    assert schemas["DesktopOut"]["properties"]["busy"].get("description")


def test_bodies_answers_and_errors_are_the_handlers_types(document):
    schemas = document["components"]["schemas"]
    create = document["paths"][API + "/tasks"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CreateTask"}
    assert set(schemas["CreateTask"]["required"]) == {"type", "content"}
    assert schemas["CreateTask"]["additionalProperties"] is False
    assert create["responses"]["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Task"}
    assert {"Location", "ETag"} <= create["responses"]["201"]["headers"].keys()
    task_fields = {
        "id", "type", "content", "title", "description", "status", "projectId", "desktopId", "agentId",
        "requiresApproval", "priority", "timeoutSeconds", "metadata", "dependsOn", "webhookUrl", "createdBy",
        "createdAt", "startedAt", "completedAt", "archived", "version", "runs", "result", "error", "watchers", "queuePosition",
    }
    assert task_fields <= schemas["Task"]["properties"].keys()
    assert schemas["Error"]["required"] == ["detail", "code"]
    for path, method, operation in operations(document):
        for status, answer in operation["responses"].items():
            if int(status) >= 400 and (path, status) != ("/readyz", "503"):
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (
                    method, path, status)
        if operation["security"]:
            assert {"401", "403"} <= operation["responses"].keys(), (method, path)
        for parameter in operation["parameters"]:
            if parameter["in"] == "path":  # an id, a desktop's or device's name, an artifact's name or SHA-256
                assert parameter["required"] and (parameter["schema"].get("format") == "uuid" or (
                    parameter["schema"] == PATH_PARAMS.get(parameter["name"]))), (method, path)
    list_tasks = document["paths"][API + "/tasks"]["get"]
    assert {p["name"] for p in list_tasks["parameters"]} == {
        "status", "desktopId", "agentId", "projectId", "search", "archived", "sort", "limit", "offset"}


def _scoped_keys(target: InProcess) -> dict[str, tuple[str, str]]:
    """Per scope: a key with that scope alone, and one with every other scope but admin (and worker, which is
    always alone); all as `admin` so that they see the same tasks. The worker key is for desktop `scoped`."""
    others = [s for s in SCOPES if s not in ("admin", "worker")]
    wanted = {(scope, only): ",".join([scope] if only else [s for s in others if s != scope])
              for scope in SCOPES for only in (True, False)}

    def issue(scopes: str) -> str:
        return target.token("admin", scopes, desktop="scoped" if scopes == "worker" else None)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        tokens = dict(zip(wanted, pool.map(issue, wanted.values())))
    return {scope: (tokens[scope, True], tokens[scope, False]) for scope in SCOPES}


def _pending_approval(client: httpx.Client) -> str:
    task = client.post("/tasks", json={"type": "prompt", "content": "needs a yes", "requiresApproval": True}).json()
    assert client.post(f"/tasks/{task['id']}/run").status_code == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = [a for a in client.get("/approvals").json() if a["taskId"] == task["id"]]
        if found:
            return found[0]["id"]
        time.sleep(0.05)
    raise AssertionError("the echo run never reached review")


def test_every_route_needs_the_scope_the_document_names(app, document):
    admin = app.client()
    ids = {
        "task_id": admin.post("/tasks", json={"type": "prompt", "content": "scoped"}).json()["id"],
        "agent_id": ECHO_AGENT_ID,
        "project_id": admin.post("/projects", json={"name": "scoped"}).json()["id"],
        "approval_id": _pending_approval(admin),
        "desktop_id": "local",
        "device_id": "scope-test",
        "run_id": str(uuid.uuid4()),
        "name": "scoped.txt",
        "sha256": "0" * 64,
    }
    keys = _scoped_keys(app)
    checked = 0
    with app.http() as http:
        for path, method, operation in operations(document):
            if not operation["security"]:
                continue
            scope = operation["security"][0]["bearer"][0]
            url = path.format(**ids)
            body = BODIES.get(operation["operationId"])
            for token, refused in ((keys[scope][1], True), (keys[scope][0], False)):
                with http.stream(method.upper(), url, json=body, headers={"Authorization": f"Bearer {token}"}) as answer:
                    if refused:
                        assert answer.status_code == 403, (method, path, scope, answer.status_code)
                    else:
                        assert answer.status_code not in (401, 403), (method, path, scope, answer.read())
            checked += 1
    assert checked == sum(1 for *_, op in operations(document) if op["security"])


def test_the_public_routes_need_no_key(app, document):
    for path, method, operation in operations(document):
        if not operation["security"]:
            assert app.http().request(method, path).status_code == 200, path


def _config(target: Server | None = None) -> schemathesis.Config:
    where = {"base-url": target.base_url, "headers": {"Authorization": f"Bearer {target.admin_token}"}} if target else {}
    return schemathesis.Config.from_dict({
        **where,
        "generation": {"max-examples": 6},
        "checks": CHECKS,
        "request-timeout": 10,
        # The stream never ends: read what arrives in half a second (a heartbeat or two among it), then judge it.
        "operations": [{"include-operation-id": "activity_stream", "request-timeout": 0.5, "max-stream-events": 20}],
    })


# Collected from the document the app builds (the served one is the same: see the first test); the
# requests go to the module's server, whose address is known only when the test runs.
schema = schemathesis.openapi.from_dict(openapi.build(create_app(Settings()).routes), config=_config())


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_no_generated_request_breaks_the_server_or_the_schema(case, fuzzed):
    case.call_and_validate(base_url=fuzzed.base_url, headers={"Authorization": f"Bearer {fuzzed.admin_token}"})


def test_no_sequence_of_calls_breaks_the_server_or_the_schema(fuzzed, document):
    """Follows the document's links: create a task, then run, cancel, review... it with the id it got."""
    machine = schemathesis.openapi.from_dict(document, config=_config(fuzzed)).as_state_machine()
    machine.run(settings=settings(
        max_examples=25, stateful_step_count=6, deadline=None, suppress_health_check=list(HealthCheck),
        derandomize=True, database=None,  # the same calls every run: a failure reproduces, never flakes
    ))
