"""Schema evolution: a log recorded when task.failed was at schema 1 still verifies, replays and serves.

tests/fixtures/v1-log.ndjson was recorded (tests/make_v1_fixture.py) before task.failed moved
to schema 2, where its free-text `reason` became one of a fixed set (FailureKind). The log keeps and serves the v1
payloads as recorded; deciders and projections read them through the upcaster.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest

from events import RecordedEvent, decode
from events import types as t
from tests.audit_sqlite import database, read_models
from tests.audit_tools import differences, settled
from tests.inprocess import InProcess
from tests.server import cli

pytestmark = pytest.mark.sqlite_file

FIXTURE = Path(__file__).parent / "fixtures" / "v1-log.ndjson"
LINES = FIXTURE.read_bytes().splitlines(keepends=True)
RECORDED = [json.loads(line) for line in LINES]
FAILED = {e["payload"]["taskId"]: e for e in RECORDED if e["type"] == "task.failed"}
ERRORED, REJECTED = (next(i for i, e in FAILED.items() if e["payload"]["reason"] == r) for r in ("error", "rejected"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("v1") / "data"
    cli(data_dir, "import", str(FIXTURE))
    return data_dir


@pytest.fixture(scope="module")
def v1_server(imported, tmp_path_factory):
    """The app on a copy of the imported log, with an admin key of our own (the log's is unknown)."""
    data_dir = tmp_path_factory.mktemp("served") / "data"
    shutil.copytree(imported, data_dir)
    token = cli(data_dir, "token", "create", "--user", "auditor", "--scopes", "admin").stdout.splitlines()[-1]
    (data_dir / "admin-token").write_text(token)
    with InProcess(data_dir).start() as s:
        yield s


def test_the_fixture_is_a_v1_log_of_a_type_now_at_v2():
    assert t.TaskFailed.schema == 2
    assert {e["meta"]["schema"] for e in RECORDED} == {1}


def test_it_verifies(v1_server):
    assert cli(v1_server.data_dir, "verify").returncode == 0
    report = v1_server.client().get("/audit/verify").json()
    assert report["ok"] is True and report["checked"] >= len(LINES)


def test_it_serves_every_event_as_recorded(v1_server):
    client = v1_server.client()
    ndjson = client.get("/events", headers={"Accept": "application/x-ndjson"}).content
    assert ndjson.splitlines(keepends=True)[: len(LINES)] == LINES

    page = client.get("/events", params={"types": "task.failed", "limit": 2}).json()["events"]
    assert page == [FAILED[ERRORED], FAILED[REJECTED]]

    frames = []
    with client.stream("GET", "/activity/stream", params={"types": "task.failed"}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                frames.append(line.removeprefix("data: ").encode() + b"\n")
            if len(frames) == 2:
                break
    assert frames == [LINES[e["position"] - 1] for e in (FAILED[ERRORED], FAILED[REJECTED])]


def test_it_replays_into_todays_state(v1_server, imported, tmp_path):
    client = v1_server.client()
    errored, rejected = client.get(f"/tasks/{ERRORED}").json(), client.get(f"/tasks/{REJECTED}").json()
    assert (errored["status"], errored["error"]) == ("failed", "disk full")
    assert (rejected["status"], rejected["error"]) == ("failed", "rejected: too vague")
    as_of = client.get(f"/tasks/{ERRORED}", params={"asOf": FAILED[ERRORED]["position"]}).json()
    assert as_of["status"] == "failed"

    # The same log folded again from scratch, upcasting on the way, gives the same read models.
    copy = tmp_path / "copy"
    shutil.copytree(imported, copy)
    before = read_models(database(copy))
    cli(copy, "rebuild")
    assert not differences(read_models(database(copy)), before)


def test_deciders_read_it_and_new_failures_are_recorded_at_v2(v1_server):
    client = v1_server.client()
    assert client.post(f"/tasks/{ERRORED}/retry").json()["status"] == "pending"
    client.post(f"/tasks/{ERRORED}/run").raise_for_status()
    assert settled(client, ERRORED)["status"] == "failed"

    failures = [e for e in client.get(f"/tasks/{ERRORED}/events").json() if e["type"] == "task.failed"]
    assert failures[0] == FAILED[ERRORED]
    assert failures[1]["meta"]["schema"] == 2
    assert failures[1]["payload"]["reason"] == "error"
    assert client.get("/audit/verify").json()["ok"] is True


@pytest.mark.parametrize("reason, upcast_reason, error", [
    ("timeout", "timeout", "took too long"),
    ("oom", "error", "oom: took too long"),  # not a FailureKind: the word is kept in the message
])
def test_the_upcaster_turns_free_text_into_a_failure_kind(reason, upcast_reason, error):
    v1 = RecordedEvent(
        position=1, stream="task-x", version=1, type="task.failed",
        payload=msgspec.Raw(json.dumps({"taskId": "x", "reason": reason, "error": "took too long"}).encode()),
        meta=msgspec.Raw(b'{"schema":1}'), recorded_at="2026-01-01T00:00:00Z", hash="",
    )
    assert decode(v1) == t.TaskFailed(task_id="x", reason=upcast_reason, error=error)

