"""The `worker` scope: a key issued for a desktop acts as that desktop's worker and nothing else,
and no other key acts as a worker (an admin key names no desktop)."""

from __future__ import annotations

import re
import uuid

import pytest

from service.api import API_PREFIX
from service.http import auth
from tests.api_helpers import UNLIMITED, refused
from tests.inprocess import InProcess
from tests.test_cli import data_dir, events_in, one_sentence, run  # noqa: F401 (data_dir: a fixture)

WORKER = API_PREFIX + "/worker/"
REGISTER = {"sessionId": "s-1", "agents": ["echo"], "capacity": 1, "version": "test", "hostname": "here"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with InProcess(tmp_path_factory.mktemp("worker-scope") / "data", UNLIMITED).start() as started:
        yield started


@pytest.fixture(scope="module")
def document(app) -> dict:
    return app.http().get("/openapi.json").json()


def secured(document: dict):
    """(method, path, operation) of every operation that needs a key."""
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if operation["security"]:
                yield method, path, operation


def _url(path: str) -> str:
    """The path with every parameter filled: a scope is checked before any id is looked at."""
    return re.sub(r"\{(\w+)\}", lambda m: "local" if m[1] == "desktop_id" else str(uuid.uuid4()), path)


def test_a_worker_key_is_refused_on_every_route_that_is_not_a_worker_route(app, document):
    token = app.token("ci", "worker", desktop="box-1")
    others = [(m, p) for m, p, _ in secured(document) if not p.startswith(WORKER)]
    assert len(others) > 30, "the document lists the API's routes"
    with app.http() as http:
        for method, path in others:
            with http.stream(method.upper(), _url(path), json={}, headers={"Authorization": f"Bearer {token}"}) as answer:
                assert answer.status_code == 403, (method, path, answer.status_code, answer.read()[:300])


def test_only_a_worker_key_for_a_desktop_passes_the_worker_routes(app, document):
    worker_routes = [(m, p) for m, p, op in secured(document) if p.startswith(WORKER)]
    assert {p.removeprefix(WORKER) for _, p in worker_routes} >= {
        "register", "poll", "runs/{run_id}/output", "runs/{run_id}/ask", "runs/{run_id}/finish", "drain", "leave"}
    every_other_scope = app.token("admin", "task:read,task:write,approval:write,agent:write,audit:read")
    with app.http() as http:
        for token in (app.admin_token, every_other_scope):
            for method, path in worker_routes:
                answer = http.request(method.upper(), _url(path), json={}, headers={"Authorization": f"Bearer {token}"})
                refused(answer, 403, "forbidden", mentions=("worker", "desktop"))


def test_register_naming_another_desktop_is_not_found_and_records_nothing(app):
    worker = app.client(app.token("ci", "worker", desktop="box-2"))
    head = app.call(app.log.read_head())
    refused(worker.post("/worker/register", json={**REGISTER, "desktopId": "box-3"}), 404, "not_found",
            mentions=("box-2",))
    assert app.call(app.log.read_head()) == head
    assert app.client().get("/desktops/box-3").status_code == 404


def test_a_worker_key_cannot_take_over_the_nodes_own_desktop(app):
    worker = app.client(app.token("ci", "worker", desktop="local"))
    head = app.call(app.log.read_head())
    refused(worker.post("/worker/register", json=REGISTER), 409, "invalid_status")
    assert app.call(app.log.read_head()) == head


def test_a_revoked_worker_key_is_unauthorized(app):
    token = app.token("ci", "worker", desktop="box-revoked")
    worker = app.client(token)
    assert worker.post("/worker/register", json=REGISTER).status_code == 200
    key = app.call(app.models.api_key_by_hash(auth.hash_token(token)))
    app.call(auth.revoke_key(app.log, app.models, key.id))
    refused(worker.post("/worker/poll", json={"epoch": 1, "free": 1}), 401, "unauthorized")


def test_a_report_on_another_desktops_run_is_not_found(app):
    admin = app.client()
    alpha = app.client(app.token("ci", "worker", desktop="alpha"))
    beta = app.client(app.token("ci", "worker", desktop="beta"))
    assert alpha.post("/worker/register", json=REGISTER).status_code == 200
    epoch = beta.post("/worker/register", json=REGISTER).json()["epoch"]
    task = admin.post("/tasks", json={"type": "prompt", "content": "on beta", "desktopId": "beta"}).json()
    run_id = admin.post(f"/tasks/{task['id']}/run").json()["runId"]
    lease = {"MC-Lease": f"{run_id}:{epoch}"}
    chunk = {"chunks": [{"seq": 1, "stream": "stdout", "chunk": "hello\n"}]}
    head = app.call(app.log.read_head())
    refused(alpha.post(f"/worker/runs/{run_id}/output", json=chunk, headers=lease), 404, "not_found")
    refused(alpha.post(f"/worker/runs/{run_id}/finish", json={"outcome": "done", "result": "x"}, headers=lease),
            404, "not_found")
    assert app.call(app.log.read_head()) == head
    assert beta.post(f"/worker/runs/{run_id}/output", json=chunk, headers=lease).json() == {"ackedSeq": 1}


A_RUN = "77053617-0310-4687-a209-5f6861611fe1"
"""Not a run of the test's: a lease for another run. Fixed, so every test worker collects the same ids."""


@pytest.mark.parametrize("lease", [None, "", "garbage", "run:²".encode("latin-1"), f"{A_RUN}:1"])
def test_a_report_without_its_runs_lease_is_bad_input(app, lease):
    worker = app.client(app.token("ci", "worker", desktop="box-4"))
    headers = {} if lease is None else {"MC-Lease": lease}
    run_id = str(uuid.uuid4())
    refused(worker.post(f"/worker/runs/{run_id}/output", json={"chunks": []}, headers=headers), 400,
            mentions=("MC-Lease",))


# --- token create ----------------------------------------------------------------------------------


REFUSED_KEYS = [
    (["--scopes", "worker"], "needs --desktop"),
    (["--scopes", "worker,task:read", "--desktop", "box"], "only scope"),
    (["--scopes", "worker", "--desktop", "box", "--project", "admin (default)"], "leave out --project"),
    (["--scopes", "task:read", "--desktop", "box"], "--desktop is for worker keys"),
    (["--scopes", "admin", "--desktop", "box"], "--desktop is for worker keys"),
    (["--scopes", "worker", "--desktop", "Box"], "is not 1 to 63"),
    (["--scopes", "worker", "--desktop=-box"], "is not 1 to 63"),
    (["--scopes", "worker", "--desktop", "box\n"], "is not 1 to 63"),
    (["--scopes", "worker", "--desktop", "b" * 64], "is not 1 to 63"),
]


def test_token_create_refuses_a_worker_key_that_is_not_for_one_desktop(data_dir):  # noqa: F811
    for args, says in REFUSED_KEYS:
        result = run("token", "create", "--user", "ci", *args, "--data-dir", str(data_dir))
        assert result.returncode == 2, (args, result)
        assert says in one_sentence(result), args
    assert events_in(data_dir) == 19  # nothing appended, not even the user's default project


def test_token_create_issues_a_worker_key_for_its_desktop(data_dir):  # noqa: F811
    created = run("token", "create", "--user", "ci", "--scopes", "worker", "--desktop", "box.lab-1",
                  "--data-dir", str(data_dir))
    assert created.returncode == 0, created.stderr
    assert "as desktop box.lab-1" in created.stdout
    assert created.stdout.splitlines()[-1].startswith("mc_")
    key_id = created.stdout.split()[1]
    listed = run("token", "list", "--data-dir", str(data_dir)).stdout.splitlines()
    assert next(line for line in listed if line.startswith(key_id)).split()[-2:] == ["worker", "box.lab-1"]
