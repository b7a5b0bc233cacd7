"""Artifacts through the real server: staged for a run, found under inputs/, left under outputs/,
listed and served by their SHA-256, refused with a sentence (appending nothing) when they cannot be."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import httpx
import msgspec
import pytest

from tests.api_helpers import UNLIMITED, log_unchanged, no_unhandled_errors, read_log, refused
from tests.server import BACKEND, Server, cli, storage_env
from tests.worker import Worker, shell_agent, wait_status

READS_AND_WRITES = "mkdir -p outputs; tr a-z A-Z < inputs/x > outputs/y.txt; cat inputs/x"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage(client: httpx.Client, task_id: str, name: str, data: bytes, content_type: str | None = None,
          **options) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return client.put(f"/tasks/{task_id}/artifacts/{name}", content=data, headers=headers, **options)


def new_task(client: httpx.Client, content: str = READS_AND_WRITES) -> str:
    created = client.post("/tasks", json={"type": "command", "content": content})
    assert created.status_code == 201, created.text
    return created.json()["id"]


def run(client: httpx.Client, task_id: str, agent_id: str) -> None:
    started = client.post(f"/tasks/{task_id}/run", json={"agentId": agent_id})
    assert started.status_code == 200, started.text


def test_a_staged_file_is_the_next_runs_input_and_what_it_leaves_its_output(make_server):
    server = make_server(**UNLIMITED)
    client = server.client()
    agent = shell_agent(client, "files")
    task_id = new_task(client)
    assert stage(client, task_id, "x", b"first\n").status_code == 201
    staged = stage(client, task_id, "x", b"hello artifacts\n", "text/plain")  # replaces the first, before the run
    assert staged.status_code == 201, staged.text
    assert staged.json() == {
        "name": "x", "sha256": sha(b"hello artifacts\n"), "size": 16, "contentType": "text/plain", "runId": None,
        "direction": "input", "createdAt": staged.json()["createdAt"],
    }
    run(client, task_id, agent)
    done = wait_status(client, task_id, "done", "failed")
    assert done["status"] == "done", done
    assert done["result"] == "hello artifacts\n"  # the run read inputs/x

    listed = client.get(f"/tasks/{task_id}/artifacts").json()
    run_id = done["runId"]
    assert [(a["name"], a["sha256"], a["direction"], a["runId"], a["contentType"]) for a in listed] == [
        ("x", sha(b"hello artifacts\n"), "input", run_id, "text/plain"),
        ("y.txt", sha(b"HELLO ARTIFACTS\n"), "output", run_id, "text/plain"),
    ]
    runs = client.get(f"/tasks/{task_id}/runs").json()
    assert runs[-1]["artifacts"] == [sha(b"hello artifacts\n"), sha(b"HELLO ARTIFACTS\n")]
    for artifact, data in zip(listed, (b"hello artifacts\n", b"HELLO ARTIFACTS\n")):
        got = client.get(f"/tasks/{task_id}/artifacts/{artifact['sha256']}")
        assert got.status_code == 200 and got.content == data
        assert got.headers["content-type"] == "text/plain"
        assert got.headers["content-disposition"] == (
            f"attachment; filename=\"{artifact['name']}\"; filename*=UTF-8''{artifact['name']}")

    # Staged after the run started, a file is the next run's: this run's listing is unchanged.
    assert stage(client, task_id, "later", b"for the next run").json()["runId"] is None
    events, _ = read_log(client)
    types = [e.type for e in events if e.stream == f"task-{task_id}"]
    started = types.index("task.started")
    assert types[started:started + 2] == ["task.started", "artifact.recorded"]  # consumed in its append
    assert types[-1] == "artifact.staged"
    no_unhandled_errors(server)


def test_names_and_bodies_that_cannot_be_an_artifact_are_refused_and_append_nothing(make_server):
    server = make_server(MC_MAX_ARTIFACT_BYTES="1000", **UNLIMITED)
    client = server.client()
    task_id = new_task(client)
    other = server.client(server.token("mallory", "task:read,task:write"))
    with log_unchanged(client):
        for name, mentions in (("%2E%2E", "path segment"), ("%2E", "path segment"), ("a%2Fb", "'/'"),
                               ("%2E%2E%2Fx", "'/'"), ("a%5Cb", "'\\'"), ("a%00b", "NUL"), ("n" * 256, "255")):
            refused(stage(client, task_id, name, b"data"), 400, "invalid_name", (mentions,))
        refused(stage(client, task_id, "empty", b""), 400, mentions=("no bytes",))
        refused(stage(client, task_id, "big", b"x" * 1001), 413, "body_too_large", ("1000",))

        def chunked():  # no Content-Length: refused as the count passes the limit
            for _ in range(20):
                yield b"y" * 100

        refused(stage(client, task_id, "big", chunked()), 413, "body_too_large")
        refused(stage(client, task_id, "x", b"data", "not a type"), 400, mentions=("media type",))
        refused(stage(client, "7d3f1c9e-8f4a-4a55-9a0c-1f2e3d4c5b6a", "x", b"data"), 404)
        refused(client.get(f"/tasks/{task_id}/artifacts/{sha(b'data')}"), 404)
        refused(stage(other, task_id, "x", b"data"), 404)  # another user's project: not found
        refused(other.get(f"/tasks/{task_id}/artifacts"), 404)
    assert client.get(f"/tasks/{task_id}/artifacts").json() == []
    leftover = [p for p in (server.data_dir / "artifacts").rglob("*") if p.is_file()]
    assert leftover == [] or server.env.get("MC_DATABASE_URL"), leftover
    no_unhandled_errors(server)


def test_a_name_is_served_escaped_in_content_disposition(make_server):
    server = make_server(**UNLIMITED)
    client = server.client()
    task_id = new_task(client)
    name = 'r\u00e9sum\u00e9 "final" 100%.pdf'
    put = stage(client, task_id, httpx.URL(f"/{name}").raw_path.decode()[1:], b"%PDF-1.7", "application/pdf")
    assert put.status_code == 201, put.text
    assert put.json()["name"] == name
    got = client.get(f"/tasks/{task_id}/artifacts/{sha(b'%PDF-1.7')}")
    assert got.headers["content-type"] == "application/pdf"
    assert got.headers["content-disposition"] == (
        "attachment; filename=\"r_sum_ _final_ 100_.pdf\"; "
        "filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22%20100%25.pdf")


def test_a_remote_worker_fetches_the_inputs_and_uploads_the_outputs(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    client = server.client()
    data = bytes(range(256)) * 5000  # over a megabyte: more than one of the store's chunks
    with Worker(server, "box", tmp_path / "box", agents="shell").start():
        agent = shell_agent(client, "remote-files")
        created = client.post("/tasks", json={"type": "command", "desktopId": "box", "content": (
            "mkdir -p outputs; cp inputs/x outputs/copy.bin; sha256sum inputs/x | cut -c1-64")})
        task_id = created.json()["id"]
        assert stage(client, task_id, "x", data).status_code == 201
        run(client, task_id, agent)
        done = wait_status(client, task_id, "done", "failed")
        assert done["status"] == "done", done
        assert done["result"] == sha(data) + "\n"  # the worker's copy of the input holds its bytes
    listed = client.get(f"/tasks/{task_id}/artifacts").json()
    assert [(a["name"], a["sha256"], a["direction"], a["contentType"]) for a in listed] == [
        ("x", sha(data), "input", "application/octet-stream"), ("copy.bin", sha(data), "output", "application/octet-stream")]
    assert client.get(f"/tasks/{task_id}/artifacts/{sha(data)}").content == data
    assert (tmp_path / "box" / "runs" / done["runId"] / "inputs" / "x").read_bytes() == data
    no_unhandled_errors(server)


def test_an_approval_judges_the_runs_outputs_and_its_resolution_names_them(make_server):
    server = make_server(**UNLIMITED)
    client = server.client()
    agent = shell_agent(client, "reviewed")
    created = client.post("/tasks", json={"type": "command", "requiresApproval": True, "content": (
        "mkdir -p outputs; echo draft > outputs/a.md; echo chart > outputs/b.csv")})
    task_id = created.json()["id"]
    run(client, task_id, agent)
    review = wait_status(client, task_id, "review", "failed")
    assert review["status"] == "review", review
    outputs = [sha(b"draft\n"), sha(b"chart\n")]
    approval = client.get(f"/approvals/{review['approvalId']}").json()
    assert approval["artifacts"] == outputs
    resolved = client.post(f"/approvals/{approval['id']}/resolve", json={"decision": "approve"})
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["artifacts"] == outputs
    events, _ = read_log(client)
    resolution = next(e for e in events if e.type == "approval.resolved")
    assert msgspec.json.decode(resolution.payload)["artifacts"] == outputs  # the chain covers what was approved


def _alter(data_dir, sha256: str) -> None:
    """One byte of a stored artifact changed behind the service's back, wherever the backend keeps it."""
    url = storage_env(data_dir).get("MC_DATABASE_URL")
    if url is None:
        path = data_dir / "artifacts" / sha256[:2] / sha256
        path.write_bytes(b"X" + path.read_bytes()[1:])
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE artifact_chunks SET data = 'X'::bytea || substring(data from 2) "
                     "WHERE sha256 = %s AND seq = 0", (sha256,))


def test_verify_checks_the_bytes_and_export_import_carries_them(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    client = server.client()
    agent = shell_agent(client, "carried")
    task_id = new_task(client)
    stage(client, task_id, "x", b"carried across\n")
    run(client, task_id, agent)
    assert wait_status(client, task_id, "done", "failed")["status"] == "done"
    server.stop()

    assert "2 artifacts match their hashes" in cli(server.data_dir, "verify").stdout
    export = tmp_path / "log.ndjson"
    export.write_text(cli(server.data_dir, "export", "--artifacts", str(tmp_path / "bytes")).stdout)
    assert sorted(p.name for p in (tmp_path / "bytes").iterdir()) == sorted([sha(b"carried across\n"),
                                                                              sha(b"CARRIED ACROSS\n")])
    lacking = cli(tmp_path / "empty", "import", str(export), "--artifacts", str(tmp_path / "nowhere"), check=False)
    assert lacking.returncode != 0 and "nothing imported" in lacking.stderr, lacking
    cli(tmp_path / "replica", "import", str(export), "--artifacts", str(tmp_path / "bytes"))
    assert "2 artifacts match their hashes" in cli(tmp_path / "replica", "verify").stdout
    output = sha(b"CARRIED ACROSS\n")
    (tmp_path / "replica" / "admin-token").write_text(server.admin_token)  # its key came with the log
    replica = make_server(tmp_path / "replica", **UNLIMITED)
    got = replica.client().get(f"/tasks/{task_id}/artifacts/{output}")
    assert got.status_code == 200 and got.content == b"CARRIED ACROSS\n"

    _alter(server.data_dir, output)
    damaged = cli(server.data_dir, "verify", check=False)
    assert damaged.returncode == 1
    assert f"artifact {output} ('y.txt' of task {task_id}) is altered" in damaged.stderr


def _tiny_disk_server(make_server, tmp_path) -> Server | None:
    """A server whose artifact store is a 256 KiB tmpfs of its own (a mount namespace of its own, so no
    other process sees it): a real full disk. None where mounts cannot be made (not root)."""
    data_dir = tmp_path / "tiny"
    (data_dir / "artifacts").mkdir(parents=True)
    mount = f"mount -t tmpfs -o size=256k tmpfs {data_dir / 'artifacts'}"
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", mount], capture_output=True).returncode != 0:
        return None
    server = Server(data_dir, UNLIMITED)
    serve = server.argv()
    server.argv = lambda: ["unshare", "-m", "sh", "-c", f'{mount} && exec "$0" "$@"', *serve]
    return server.start()


@pytest.mark.skipif(BACKEND != "sqlite", reason="on PostgreSQL the bytes go to the database, not to a disk of ours")
def test_a_full_disk_answers_507_and_records_nothing(make_server, tmp_path):
    server = _tiny_disk_server(make_server, tmp_path)
    if server is None:
        pytest.skip("no mount namespace can be made here (needs root): no real full disk to fill")
    try:
        client = server.client()
        task_id = new_task(client)
        with log_unchanged(client):
            refused(stage(client, task_id, "big", b"z" * (1024 * 1024)), 507, "insufficient_storage",
                    ("out of space",))
        assert client.get(f"/tasks/{task_id}/artifacts").json() == []
        seen = Path(f"/proc/{server.process.pid}/root") / (server.data_dir / "artifacts").relative_to("/")
        assert [p for p in seen.rglob("*") if p.is_file()] == []  # no partial file left behind
        assert stage(client, task_id, "small", b"fits").status_code == 201  # the space came back
        no_unhandled_errors(server)
    finally:
        server.stop()


def test_an_output_that_cannot_be_stored_fails_the_run_naming_it(make_server):
    server = make_server(MC_MAX_ARTIFACT_BYTES="1000", **UNLIMITED)
    client = server.client()
    agent = shell_agent(client, "too-much")
    task_id = new_task(client, "mkdir -p outputs outputs/sub; head -c 2000 /dev/zero > outputs/big; "
                               "ln -s /etc/passwd outputs/link; echo ok > outputs/sub/skipped")
    run(client, task_id, agent)
    failed = wait_status(client, task_id, "done", "failed")
    assert failed["status"] == "failed" and "'big'" in failed["error"] and "1000" in failed["error"], failed
    assert client.get(f"/tasks/{task_id}/artifacts").json() == []  # nor the symlink, nor what lies in a directory
    no_unhandled_errors(server)
