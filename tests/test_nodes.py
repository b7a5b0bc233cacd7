"""Several `serve` processes on one log (issue 15), on both backends: one SQLite data dir shared,
or one PostgreSQL database with a data dir each. Nodes starting together issue one admin key,
and a node whose contract settings differ from the log's refuses to start."""

from __future__ import annotations

import asyncio

import pytest

from service.cli import _Failed, _with_log, agree_settings, first_admin_key
from service.settings import from_env
from tests.server import Nodes, Server

BACKENDS = ["sqlite", "postgres"]


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
