"""Who may do what: API keys and their scopes on every route the app registers, what every
appended event records about its request, the per-key rate limit, and the request limits."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.routing import Mount, Route

from service.app import create_app
from service.http.auth import SCOPES
from service.http.endpoints import declaration_of, walk
from service.work.local import NODE_ACTOR
from service.settings import Settings
from tests.api_helpers import head, log_unchanged, read_log, refused, wait_for
from tests.server import API, Server, cli, free_port

# --- the contract, once ------------------------------------------------------------------

_A = re.escape(API)
_ID = "[^/]+"
SCOPE_TABLE: tuple[tuple[str, frozenset[str], str], ...] = (
    # API.md "Authentication and scopes": (scope, methods, route path pattern).
    ("task:read", frozenset({"GET"}),
     rf"{_A}/(tasks|approvals|agents|projects|desktops)(/.*)?|{_A}/(overview|me)|{_A}/activity/stream"),
    ("task:read", frozenset({"GET", "POST", "DELETE"}), rf"{_A}/devices(/{_ID})?"),
    ("task:write", frozenset({"POST", "PATCH", "PUT", "DELETE"}),
     rf"{_A}/tasks(/{_ID}(/(run|cancel|retry|messages|presence|artifacts/{_ID}))?)?"),
    ("approval:write", frozenset({"POST"}), rf"{_A}/tasks/{_ID}/review|{_A}/approvals/{_ID}/resolve"),
    ("agent:write", frozenset({"POST", "PATCH"}), rf"{_A}/agents(/{_ID}(/(pause|resume))?)?"),
    ("audit:read", frozenset({"GET"}), rf"{_A}/events|{_A}/audit/.+"),
    ("admin", frozenset({"POST", "PATCH"}), rf"{_A}/projects(/{_ID})?"),
    ("admin", frozenset({"GET"}), r"/metrics"),
    ("admin", frozenset({"POST"}), rf"{_A}/desktops/{_ID}/(drain|resume)"),
    ("admin", frozenset({"DELETE"}), rf"{_A}/desktops/{_ID}"),
    ("worker", frozenset({"GET", "POST", "PUT"}), rf"{_A}/worker/.+"),
)
PUBLIC: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"GET"}), r"/healthz|/readyz|/openapi\.json|/|/static/.*"),
)
"""Routes that need no token (and /metrics, with MC_METRICS_PUBLIC=1)."""


def endpoints() -> list[tuple[str, str]]:
    """(method, path template) of every route the app registers; HEAD is GET's twin."""
    found = []
    def under(routes, prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount) and not route.routes:  # files
                found.append(("GET", prefix + route.path + "/{path}"))
            elif isinstance(route, Mount):
                under(route.routes, prefix + route.path)
            else:
                # Any other kind (a WebSocketRoute) would need its own authentication: the middleware
                # closes every websocket.
                assert isinstance(route, Route), f"{route!r} is neither an HTTP route nor a mount"
                found.extend((method, prefix + route.path) for method in sorted(route.methods))

    found: list[tuple[str, str]] = []
    under(create_app(Settings()).routes, "")
    return found


def _matches(methods: frozenset[str], pattern: str, method: str, path: str) -> bool:
    return (method.replace("HEAD", "GET") in methods) and re.fullmatch(pattern, path) is not None


def needed_scope(method: str, path: str) -> str | None:
    """The scope API.md names for this route; None for a public one."""
    public = any(_matches(m, p, method, path) for m, p in PUBLIC)
    scoped = [scope for scope, m, p in SCOPE_TABLE if _matches(m, p, method, path)]
    assert public + len(scoped) == 1, f"{method} {path}: not exactly one row of the scope table ({scoped})"
    return None if public else scoped[0]


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda _: str(uuid.uuid4()), path)


def status_of(client: httpx.Client, method: str, path: str, **options) -> httpx.Response:
    """The response's status and headers without its body: the activity stream never ends."""
    with client.stream(method, path, **options) as response:
        if response.status_code >= 400 and method != "HEAD":
            response.read()
        return response


# --- keys ----------------------------------------------------------------------------


def issued(server: Server, token: str) -> dict:
    """The key's apikey.issued event, found by the token's hash: the only form the log holds."""
    digest = hashlib.sha256(token.encode()).hexdigest()

    def found() -> dict | None:
        # The CLI appended it from another process: the server sees it once it notices the new head.
        events = server.client().get("/events", params={"types": "apikey.issued", "limit": 5000}).json()["events"]
        return next((e for e in events if e["payload"]["tokenHash"] == digest), None)

    return wait_for(found, what="the apikey.issued event")


def key_id(server: Server, token: str) -> str:
    return issued(server, token)["payload"]["keyId"]


def revoked_token(server: Server, user: str, scopes: str) -> str:
    token = server.token(user, scopes)
    cli(server.data_dir, "token", "revoke", key_id(server, token))
    return token


def tokens(server: Server, requests: dict[str, str]) -> dict[str, str]:
    """Issues keys concurrently through the CLI: name -> scopes in, name -> token out."""
    with ThreadPoolExecutor(4) as pool:
        issued = pool.map(lambda name: server.token(  # a worker key is `worker` alone, for a desktop
            f"user-{name}", requests[name], desktop="box" if requests[name] == "worker" else None), requests)
        return dict(zip(requests, issued))


# --- scopes on every route --------------------------------------------------------------


def test_every_registered_route_is_in_the_scope_table_and_every_row_has_a_route():
    routes = endpoints()
    used = {needed_scope(method, path) for method, path in routes}
    assert used == {None, *SCOPES}
    for scope, methods, pattern in SCOPE_TABLE:
        assert any(_matches(methods, pattern, m, p) for m, p in routes), f"no route for {scope} {pattern}"


def test_the_scope_each_route_declares_is_the_contracts():
    # The declaration is what the route enforces (service/http/endpoints.py) and what the document states.
    for path, route in walk(create_app(Settings()).routes):
        declared = declaration_of(route).scope
        for method in route.methods:
            assert declared == needed_scope(method, path), f"{method} {path} declares {declared}"


def test_every_route_refuses_missing_unknown_revoked_and_underscoped_keys(shared_app_server):
    s = shared_app_server
    lacking = {scope: ",".join(x for x in SCOPES if x not in (scope, "admin", "worker")) for scope in SCOPES}
    wanted = {f"without-{scope}": scopes for scope, scopes in lacking.items()} | {f"only-{x}": x for x in SCOPES}
    keys = {name: s.client(token) for name, token in tokens(s, wanted).items()}
    real = s.token("real", "task:read")
    credentials = {
        "no token": None,
        "an unknown token": "mc_" + uuid.uuid4().hex,
        "the recorded hash of a real token": hashlib.sha256(real.encode()).hexdigest(),
        "a revoked token": revoked_token(s, "revoked", ",".join(x for x in SCOPES if x != "worker")),
    }
    anonymous = s.client("")
    for method, template in endpoints():
        path, scope = concrete(template), needed_scope(method, template)
        url = s.base_url + path
        if scope is None:
            assert status_of(anonymous, method, url).status_code not in (401, 403), f"{method} {template} is public"
            continue
        for what, token in credentials.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = status_of(anonymous, method, url, headers=headers)
            assert response.status_code == 401, f"{method} {template} with {what}: {response.status_code}"
            assert response.headers["www-authenticate"] == "Bearer"
            if method != "HEAD":
                assert response.json()["code"] == "unauthorized"
        response = status_of(keys[f"without-{scope}"], method, url)
        assert response.status_code == 403, f"{method} {template} without {scope}: {response.status_code}"
        if method != "HEAD":
            assert scope in refused(response, 403, "forbidden")["detail"]
        # The scope alone is enough to get past authorization (to a 2xx, 400, 404, ...).
        response = status_of(keys[f"only-{scope}"], method, url)
        assert response.status_code not in (401, 403), f"{method} {template} with {scope}: {response.status_code}"


def test_only_admin_registers_or_changes_a_shell_agent(shared_app_server):
    s = shared_app_server
    operator = s.client(s.token("operator", "agent:write"))
    refused(operator.post("/agents", json={"name": "sh", "kind": "shell"}), 403, "forbidden", ("admin",))
    assert operator.post("/agents", json={"name": "echo-2", "kind": "echo"}).status_code == 201
    shell = s.client().post("/agents", json={"name": "sh", "kind": "shell"})
    assert shell.status_code == 201, shell.text
    agent = shell.json()["id"]
    with log_unchanged(s.client()):
        for method, path, body in (("PATCH", f"/agents/{agent}", {"name": "mine"}),
                                   ("POST", f"/agents/{agent}/pause", None),
                                   ("POST", f"/agents/{agent}/resume", None)):
            refused(operator.request(method, path, json=body), 403, "forbidden", ("admin",))


def test_only_admins_and_allowed_users_run_tasks_on_a_shell_agent(shared_server):
    """A shell agent runs as the service's own OS user: with task:write alone, a user could read
    the admin key file next to the log (`cat ../../admin-token`). Running on one is the admin's grant."""
    s = shared_server
    admin = s.client()
    agent = admin.post("/agents", json={"name": "box", "kind": "shell"}).json()["id"]
    mallory = s.client(s.token("mallory", "task:write,task:read"))
    steal = {"type": "command", "content": "cat ../../admin-token", "agentId": agent}
    task = mallory.post("/tasks", json=steal).json()["id"]
    with log_unchanged(admin):
        refused(mallory.post(f"/tasks/{task}/run"), 403, "forbidden", ("allowedUsers",))
    assert mallory.get(f"/tasks/{task}").json()["status"] == "pending"

    granted = admin.post("/agents", json={"name": "box-2", "kind": "shell", "config": {"allowedUsers": ["trent"]}})
    trent = s.client(s.token("trent", "task:write,task:read"))
    task = trent.post("/tasks", json={"type": "command", "content": "echo hi", "agentId": granted.json()["id"]})
    assert trent.post(f"/tasks/{task.json()['id']}/run").status_code == 200


def test_metrics_are_public_only_when_configured(make_app_server):
    s = make_app_server(MC_METRICS_PUBLIC="1")
    assert s.http().get("/metrics").status_code == 200


# --- keys are shown once and stored as hashes ----------------------------------------------


@pytest.mark.sqlite_file  # reads the SQLite file for the hash
def test_a_key_is_stored_only_as_its_hash_and_the_first_admin_key_in_a_0600_file(server):
    token = server.token("carol", "task:read,task:write")
    event = issued(server, token)  # found by the token's SHA-256
    assert event["payload"]["user"] == "carol" and event["payload"]["scopes"] == ["task:read", "task:write"]
    assert token not in json.dumps(event)
    # Nowhere at rest either: not in the database files, nor what `token list` shows.
    for path in server.data_dir.glob("mission-control.db*"):
        assert token.encode() not in path.read_bytes(), path.name
    listing = cli(server.data_dir, "token", "list").stdout
    assert "carol" in listing and token not in listing and event["payload"]["tokenHash"] not in listing
    admin_file = server.data_dir / "admin-token"
    assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600
    assert admin_file.read_text().strip() == server.admin_token
    # Printed once: a restart on the same log issues and prints no other key.
    server.restart()
    assert re.findall(r"mc_[\w-]{20,}", server.output()) == [server.admin_token]
    assert server.client().get("/tasks").status_code == 200


def test_serve_creates_a_private_data_dir_under_the_usual_umask(tmp_path):
    data_dir, port = tmp_path / "fresh" / "data", free_port()
    previous = os.umask(0o022)  # inherited by the server
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    finally:
        os.umask(previous)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/readyz"), 30, "the server to be ready")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data_dir.iterdir() if p.is_file()}
        databases = [f"mission-control{name}.db{s}" for name in ("", "-leases") for s in ("", "-wal", "-shm")]
        assert modes == dict.fromkeys(["admin-token", *databases], 0o600)
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    finally:
        process.terminate()
        process.wait(15)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --- what every append records -----------------------------------------------------------


def test_every_appended_event_records_the_actor_and_the_request_id(shared_app_server):
    s = shared_app_server
    admin = s.client()
    token = s.token("alice-meta", "task:read,task:write")
    key_id(s, token)  # the server has seen what the CLI appended: it is before `before`
    alice = s.client(token)
    before = head(admin)
    sent: dict[str, str] = {}  # request id -> the user whose key sent it

    def call(client: httpx.Client, user: str, method: str, path: str, request_id: str | None = None, **options):
        headers = {"X-Request-ID": request_id} if request_id else {}
        response = client.request(method, path, headers=headers, **options)
        assert response.status_code < 300, response.text
        echoed = response.headers["x-request-id"]
        if request_id is None:
            uuid.UUID(echoed)  # generated when the client sends none
        else:
            assert echoed == request_id
        sent[echoed] = user
        return response

    task = call(alice, "alice-meta", "POST", "/tasks", "meta-create", json={"type": "prompt", "content": "hi"}).json()
    call(alice, "alice-meta", "PATCH", f"/tasks/{task['id']}", json={"title": "renamed"})
    # Told of reviews only: this task has none, so the notifier (no request) appends nothing here.
    call(alice, "alice-meta", "POST", "/devices", json={"deviceId": "d1", "kind": "browser", "events": ["task.review"]})
    call(alice, "alice-meta", "POST", f"/tasks/{task['id']}/presence", "meta-presence", json={"deviceId": "d1"})
    call(alice, "alice-meta", "DELETE", f"/tasks/{task['id']}/presence", params={"deviceId": "d1"})
    call(alice, "alice-meta", "POST", f"/tasks/{task['id']}/run", "meta-run")
    wait_for(lambda: alice.get(f"/tasks/{task['id']}").json()["status"] == "done", what="the run to finish")
    project = call(admin, "admin", "POST", "/projects", "meta-project", json={"name": "p"}).json()
    call(admin, "admin", "PATCH", f"/projects/{project['id']}", json={"context": "c"})
    agent = call(admin, "admin", "POST", "/agents", json={"name": "e", "kind": "echo"}).json()
    call(admin, "admin", "POST", f"/agents/{agent['id']}/pause", "meta-pause")
    # An id that is not printable ASCII is replaced, not stored.
    odd = admin.post(f"/agents/{agent['id']}/resume", headers={"X-Request-ID": "caf\xe9".encode("latin-1")})
    assert odd.status_code == 200 and odd.headers["x-request-id"] != "caf\xe9"
    sent[odd.headers["x-request-id"]] = "admin"

    events, _ = read_log(admin, before)
    by_request: dict[str, set[str]] = {}
    for event in events:
        meta = json.loads(bytes(event.meta))
        if meta["actor"] == NODE_ACTOR or meta["actor"].startswith("desktop:"):
            continue  # what the run itself produced (reported by its desktop): no request caused it
        assert meta["requestId"] in sent, (event.type, meta)
        assert meta["actor"] == sent[meta["requestId"]], (event.type, meta)
        by_request.setdefault(meta["requestId"], set()).add(event.type)
    assert set(by_request) == set(sent), "a request appended nothing"
    assert "task.started" in by_request["meta-run"] and "presence.marked" in by_request["meta-presence"]
    # Error answers carry the id too.
    assert s.client("").get("/tasks", headers={"X-Request-ID": "meta-401"}).headers["x-request-id"] == "meta-401"


# --- the rate limit ------------------------------------------------------------------------


def test_each_key_has_its_own_token_bucket(make_app_server):
    s = make_app_server(MC_RATE_LIMIT_BURST="5", MC_RATE_LIMIT_PER_SECOND="1")
    admin, bob = s.client(), s.client(s.token("bob-rate", "task:read"))
    for _ in range(5):
        assert admin.get("/tasks").status_code == 200
    limited = admin.get("/tasks")
    refused(limited, 429, "rate_limited")
    assert limited.headers["retry-after"] == "1"
    assert bob.get("/tasks").status_code == 200, "another key's bucket is its own"
    assert s.http().get("/healthz").status_code == 200, "public routes are not limited"
    time.sleep(int(limited.headers["retry-after"]))  # the wait the server asked for, not synchronisation
    assert admin.get("/tasks").status_code == 200


# --- request limits ---------------------------------------------------------------------


def test_nesting_and_string_limits_and_the_content_type(shared_app_server):
    """The bounds themselves (test_security_input throws the grossly oversized at every route)."""
    admin = shared_app_server.client()
    task = {"type": "prompt", "content": "x"}
    nested = {"type": "prompt", "content": "x", "metadata": {"a": json.loads("[" * 40 + "]" * 40)}}
    with log_unchanged(admin):
        refused(admin.post("/tasks", json=nested), 400, mentions=("nested",))
        refused(admin.post("/tasks", json={**task, "title": "t" * (256 * 1024 + 1)}), 400, mentions=("longer",))
        refused(admin.post("/tasks", content=json.dumps(task).encode()), 415, "unsupported_media_type")
    assert admin.post("/tasks", json={**task, "metadata": {"a": [[[1]]]}, "title": "t" * 1000}).status_code == 201


def test_access_token_in_the_query_is_for_the_stream_only_and_never_logged(shared_app_server):
    s = shared_app_server
    token = s.token("dana", "task:read,audit:read")
    anonymous = s.client("")
    ids = []
    for path in ("/tasks", "/events", "/overview"):
        ids.append(f"query-token-{path.strip('/')}")
        response = anonymous.get(path, params={"access_token": token}, headers={"X-Request-ID": ids[-1]})
        refused(response, 401, "unauthorized")
    ids.append("query-token-stream")
    with anonymous.stream("GET", "/activity/stream", params={"access_token": token},
                          headers={"X-Request-ID": ids[-1]}) as stream:
        assert stream.status_code == 200
        assert next(stream.iter_lines()).startswith(":")  # the stream's first comment
    # The access log line of each request (the stream's is written when it ends) holds no token.
    wait_for(lambda: all(i in s.output() for i in ids), what="the access log lines")
    output = s.output()
    assert token not in output and "access_token" not in output
