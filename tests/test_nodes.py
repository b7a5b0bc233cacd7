"""Several `serve` processes on one log (issue 15), on both backends: one SQLite data dir shared,
or one PostgreSQL database with a data dir each. Nodes starting together issue one admin key,
a node whose contract settings differ from the log's refuses to start, and the nodes share the
leases: a worker may renew through any node, and a lapse is recorded once, by whichever node's
keeper sees it first (leases of 2 s; every wait bounded)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from service.cli import _Failed, _with_log, agree_settings, first_admin_key
from service.settings import from_env
from tests.api_helpers import UNLIMITED
from tests.server import Nodes, Server
from tests.worker import Worker, gone, last_run, shell_agent, start_task, wait_desktop, wait_file, wait_status

BACKENDS = ["sqlite", "postgres"]
LEASE = {"MC_LEASE_SECONDS": "2", **UNLIMITED}


@pytest.fixture(params=BACKENDS)
def nodes(request, tmp_path):
    # postgres_database first: its database is dropped after the nodes have stopped
    url = request.getfixturevalue("postgres_database") if request.param == "postgres" else None
    with Nodes(tmp_path, url) as made:
        yield made


def logged(node: Server, types: str) -> list[dict]:
    return node.client().get("/events", params={"types": types}).json()["events"]


def test_nodes_starting_together_on_an_empty_log_issue_one_admin_key(nodes):
    starting = [nodes.spawn(n) for n in range(3)]  # all at once, none waited for before the next
    for node in starting:
        node.wait_ready()
    printed = [node for node in starting if "Issued the first admin key" in node.output()]
    assert len(printed) == 1, [node.output() for node in starting]
    token = nodes.admin_token()
    assert token in printed[0].output()
    for node in starting:
        node.admin_token = token  # the one key works on every node
        issued = logged(node, "apikey.issued")
        assert [e["payload"]["scopes"] for e in issued] == [["admin"]]
        assert len(logged(node, "settings.recorded")) == 1  # the first node's settings, once


@pytest.mark.parametrize("setting, ours, theirs", [("max_concurrent", "3", "4"), ("lease_seconds", "30", "2.5")])
def test_a_node_whose_contract_setting_differs_from_the_log_s_refuses_to_start(nodes, setting, ours, theirs):
    variable = f"MC_{setting.upper()}"
    first = nodes.start(0, **{variable: ours})
    head = first.client().get("/events").json()["head"]

    refused = nodes.serve(1, **{variable: theirs})
    assert refused.returncode == 2, refused.stderr
    sentence = refused.stderr.strip()
    assert len(sentence.splitlines()) == 1, sentence
    assert sentence.startswith(f"mission-control: {setting} ({variable}) is {theirs} on this node but {ours} in the log")
    assert "--accept-settings" in sentence
    assert first.client().get("/events").json()["head"] == head  # nothing appended

    agreeing = nodes.start(1, **{variable: ours})  # the same value: it serves beside the first
    assert agreeing.client().get("/tasks").status_code == 200


def test_accept_settings_records_a_node_s_values_and_then_they_bind_every_node(nodes):
    nodes.start(0, MC_MAX_CONCURRENT="3").stop()  # every node stops before the change
    changed = nodes.start(1, "--accept-settings", MC_MAX_CONCURRENT="7")
    recorded = logged(changed, "settings.recorded")
    assert [e["payload"]["maxConcurrent"] for e in recorded] == [3, 7]
    assert changed.client().get("/overview").json()["maxConcurrent"] == 7

    refused = nodes.serve(2, MC_MAX_CONCURRENT="3")  # the old value is now the one refused
    assert refused.returncode == 2, refused.stderr
    assert "max_concurrent (MC_MAX_CONCURRENT) is 3 on this node but 7 in the log" in refused.stderr


def test_first_admin_key_run_by_three_nodes_at_once_issues_one(nodes):
    # The processes above start together only as closely as their imports allow; here the three
    # checks of an empty log certainly all happen before any of them issues.
    async def three() -> list[str | None]:
        return await asyncio.gather(*(
            first_admin_key(from_env(data_dir=str(nodes.data_dir(n)), database_url=nodes.database_url))
            for n in range(3)
        ))

    for n in range(3):
        nodes.data_dir(n).mkdir(exist_ok=True)
    tokens = [token for token in asyncio.run(three()) if token is not None]
    assert tokens == [nodes.admin_token()]


def test_of_three_nodes_recording_different_settings_at_once_the_first_is_kept_and_the_others_refused(nodes):
    async def three() -> list[object]:
        def agree(n: int):
            settings = from_env(data_dir=str(nodes.data_dir(n)), database_url=nodes.database_url, max_concurrent=3 + n)
            return _with_log(settings, lambda log, _: agree_settings(log, settings, accept=False))

        return await asyncio.gather(*(agree(n) for n in range(3)), return_exceptions=True)

    for n in range(3):
        nodes.data_dir(n).mkdir(exist_ok=True)
    outcomes = asyncio.run(three())
    assert outcomes.count(None) == 1, outcomes
    kept = 3 + outcomes.index(None)
    for refused in (o for o in outcomes if o is not None):
        assert isinstance(refused, _Failed), refused
        assert f"but {kept} in the log" in str(refused)
    assert len(logged(nodes.start(0, MC_MAX_CONCURRENT=str(kept)), "settings.recorded")) == 1


def _killed(pid_file: Path) -> None:
    """The process a run left when whatever ran it was killed -9 (nothing is left to stop it)."""
    if pid_file.exists():
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def _lapses_recorded(node: Server, task_id: str, desktop: str) -> tuple[list[dict], list[dict]]:
    """The task's `task.failed` and the desktop's `desktop.offline` events, as the log holds them."""
    failed = [e for e in logged(node, "task.failed") if e["payload"]["taskId"] == task_id]
    offline = [e for e in logged(node, "desktop.offline") if e["payload"]["desktopId"] == desktop]
    return failed, offline


def test_a_worker_renewing_through_one_node_keeps_a_run_another_started_and_its_lapse_is_recorded_once(
    nodes, tmp_path,
):
    a, b = nodes.start(0, **LEASE), nodes.start(1, **LEASE)
    worker = Worker(b, "box", tmp_path / "box", agents="shell", token=nodes.worker_token(1, "box")).start()
    client = a.client()
    agent = shell_agent(client, "sh")
    pid_file = tmp_path / "sleep.pid"
    try:
        # Three leases long, and nothing reported but polls (to b) until the end: a keeps it only
        # by the leases b renews.
        slept = start_task(client, agent, "sleep 6; echo slept", desktop="box")
        done = wait_status(client, slept, "done", "failed")
        assert (done["status"], done["result"]) == ("done", "slept\n"), last_run(client, slept)

        task_id = start_task(client, agent, f"echo $$ > {pid_file}; exec sleep 60", desktop="box")
        wait_file(pid_file)
        worker.stop(signal.SIGKILL)

        wait_status(client, task_id, "failed")
        wait_desktop(b.client(), "box", "offline")
        for node in (a, b):  # both keepers saw the lapse; one recorded it
            failed, offline = _lapses_recorded(node, task_id, "box")
            assert [e["payload"]["reason"] for e in failed] == ["lost"], failed
            assert [e["payload"]["reason"] for e in offline] == ["silent"], offline
    finally:
        worker.stop(signal.SIGKILL)
        _killed(pid_file)


def test_a_node_killed_for_good_has_its_own_desktops_run_recorded_lost_once_by_another(nodes, tmp_path):
    a, b = nodes.start(0, **LEASE), nodes.start(1, **LEASE)
    client = a.client()
    agent = shell_agent(client, "sh")
    pid_file = tmp_path / "sleep.pid"
    try:
        task_id = start_task(client, agent, f"echo $$ > {pid_file}; exec sleep 60", desktop="node-0")
        wait_file(pid_file)
        a.stop(signal.SIGKILL)

        survivor = b.client()
        wait_status(survivor, task_id, "failed")
        assert last_run(survivor, task_id)["reason"] == "lost"
        wait_desktop(survivor, "node-0", "offline")
        failed, offline = _lapses_recorded(b, task_id, "node-0")
        assert [e["payload"]["reason"] for e in failed] == ["lost"], failed
        assert [e["payload"]["reason"] for e in offline] == ["silent"], offline
    finally:
        _killed(pid_file)


def test_settings_recorded_by_schema_1_read_as_today_s():
    """Schema 1 kept the lease as a float of seconds, which RFC 8785 and the standard library
    write differently; a log holding one is read with the lease in whole milliseconds."""
    import msgspec

    from events import RecordedEvent, decode
    from events import types as t

    old = RecordedEvent(position=1, stream="settings", version=1, type="settings.recorded",
                        payload=msgspec.Raw(b'{"maxConcurrent":5,"leaseSeconds":2.5}'),
                        meta=msgspec.Raw(b'{"actor":"x","schema":1}'),
                        recorded_at="2026-12-01T00:00:00Z", hash="0" * 64)
    assert decode(old) == t.SettingsRecorded(max_concurrent=5, lease_milliseconds=2500)
