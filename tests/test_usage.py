"""Usage and cost through a real server: tokens from a real OpenAI-compatible stream on loopback
and from a real exec program's MC-USAGE line, priced to exact decimals, summed on the task, its
runs, the agent and the overview over what the caller may see; budgets refuse runs (409) and stop
one that crosses them mid-run, here and on a remote worker."""

from __future__ import annotations

import re
import sys
import textwrap
from decimal import Decimal

import msgspec
import pytest

from events import types as t
from projections.agents import Agent
from projections.tasks import TaskState
from service.commands.deciders import DispatchRun, Refused, StartRun, decide
from tests.api_helpers import UNLIMITED, log_unchanged, refused
from tests.server import Server
from tests import test_agents
from tests.test_agents import KEY_VARIABLE
from tests.test_client_cli import ok
from tests.test_runner import events, output, start, until_status
from tests.worker import Worker

PRICES = {"promptPerMillion": "0.15", "completionPerMillion": "0.60"}
DOLLAR_A_MILLION = {"promptPerMillion": "1", "completionPerMillion": "1"}


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("usage") / "data", {KEY_VARIABLE: "sk-loopback", **UNLIMITED}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api(mc):
    return mc.client()


provider = test_agents.provider
"""The OpenAI-compatible server on loopback, as the openai kind's own tests run it."""


def agent(api, kind: str, **config) -> dict:
    created = api.post("/agents", json={"name": f"{kind}-agent", "kind": kind, "config": config})
    assert created.status_code == 201, created.text
    return created.json()


def echo_task(api, agent_id: str, prompt: int, completion: int, **fields) -> dict:
    """A run of the echo agent reporting that usage, as a provider's last chunk would."""
    echo = {"usage": {"promptTokens": prompt, "completionTokens": completion}}
    created = api.post("/tasks", json={"type": "prompt", "content": "count me", "metadata": {"echo": echo}, **fields})
    assert created.status_code == 201, created.text
    run = api.post(f"/tasks/{created.json()['id']}/run", json={"agentId": agent_id})
    assert run.status_code == 200, run.text
    return until_status(api, created.json()["id"])


def usage(prompt: int, completion: int, cost: str, unpriced: int = 0) -> dict:
    return {"promptTokens": prompt, "completionTokens": completion, "costUsd": cost, "unpricedRuns": unpriced}


def test_an_openai_run_is_priced_from_the_stream_s_final_usage_chunk_to_the_exact_decimal(mc, api, provider):
    priced = agent(api, "openai", baseUrl=provider.url, model="metered", apiKeyEnv=KEY_VARIABLE,
                   params={"meter": [1234, 567]}, pricing=PRICES)
    started = start(api, priced["id"], "How much?", "prompt")
    done = until_status(api, started["id"])
    assert done["status"] == "done", done
    (request, body), = provider.requests
    assert body["stream_options"] == {"include_usage": True}

    # 1234 * 0.15 / 10^6 + 567 * 0.60 / 10^6, exactly; a float would make it 0.0005252999999999999.
    cost = "0.0005253"
    assert Decimal(cost) == (1234 * Decimal("0.15") + 567 * Decimal("0.60")) / 10**6
    (completed,) = events(api, started["id"], "task.completed")
    assert completed["payload"]["usage"] == {"promptTokens": 1234, "completionTokens": 567, "costUsd": cost}
    assert done["usage"] == usage(1234, 567, cost)
    (run,) = api.get(f"/tasks/{started['id']}/runs").json()
    assert run["usage"] == {"promptTokens": 1234, "completionTokens": 567, "costUsd": cost}
    assert api.get(f"/agents/{priced['id']}").json()["usage"] == usage(1234, 567, cost)
    shown = ok(mc, "task", "show", started["id"]).stdout  # the command line shows it too
    assert re.search(r"^usage\s+\$0\.0005253 for 1234 prompt \+ 567 completion tokens$", shown, re.M), shown


def test_a_server_that_does_not_stream_is_priced_from_its_answer_s_usage(api, provider):
    priced = agent(api, "openai", baseUrl=provider.url, model="no-stream", apiKeyEnv=KEY_VARIABLE, pricing=PRICES)
    done = until_status(api, start(api, priced["id"], "Once", "prompt")["id"])
    assert (done["status"], done["result"]) == ("done", "Whole."), done
    assert done["usage"] == usage(40, 2, "0.0000072")  # 40 * 0.15 + 2 * 0.60 millionths


USAGE_LINES = textwrap.dedent("""\
    import sys
    sys.stdin.readline()
    print("the answer", flush=True)
    sys.stderr.write("a note\\n")
    sys.stderr.write('MC-USAGE {"promptTokens": 3, "completionTokens": 4}\\n')  # superseded by the last one
    sys.stderr.write("MC-USAGE not json\\n")  # malformed: kept as output, counts for nothing
    sys.stderr.write('MC-USAGE {"promptTokens": 10, "completionTokens": 20}')  # the last line, no newline
""")


def test_an_exec_program_s_last_mc_usage_line_is_its_usage_and_not_its_output(api, tmp_path):
    program = tmp_path / "counts.py"
    program.write_text(USAGE_LINES)
    unpriced = agent(api, "exec", argv=[sys.executable, str(program)])
    started = start(api, unpriced["id"], "go", "prompt")
    done = until_status(api, started["id"])
    assert done["status"] == "done" and done["result"] == "the answer\n", done
    assert output(api, started["id"], "stderr") == "a note\nMC-USAGE not json\n"
    (run,) = api.get(f"/tasks/{started['id']}/runs").json()
    assert run["usage"] == {"promptTokens": 10, "completionTokens": 20, "costUsd": None}  # no prices named
    assert done["usage"] == usage(10, 20, "0", unpriced=1)
    assert api.get(f"/agents/{unpriced['id']}").json()["usage"] == usage(10, 20, "0", unpriced=1)


@pytest.mark.parametrize(
    ("config", "mentions"),
    [
        ({"pricing": {"promptPerMillion": "cheap", "completionPerMillion": "1"}}, ("pricing.promptPerMillion", "decimal")),
        ({"pricing": {"promptPerMillion": "0.1", "completionPerMillion": "-1"}}, ("completionPerMillion", "negative")),
        ({"pricing": {"promptPerMillion": 0.15, "completionPerMillion": "1"}}, ("string",)),
        ({"pricing": {"promptPerMillion": "0.15"}}, ("completionPerMillion",)),
        ({"budgetUsd": "-5"}, ("budgetUsd", "negative")),
        ({"budgetUsd": "1e3"}, ("budgetUsd", "decimal")),
    ],
)
def test_prices_and_budgets_that_are_not_non_negative_decimal_strings_are_refused(api, config, mentions):
    with log_unchanged(api):
        refused(api.post("/agents", json={"name": "bad", "kind": "echo", "config": config}), 400, mentions=mentions)
    fine = agent(api, "echo")
    with log_unchanged(api):
        refused(api.patch(f"/agents/{fine['id']}", json={"config": config}), 400, mentions=mentions)


def test_usage_is_summed_over_the_projects_the_caller_may_see(mc, api):
    one = api.post("/projects", json={"name": "usage-one", "members": ["ann"]}).json()["id"]
    two = api.post("/projects", json={"name": "usage-two", "members": ["ben"]}).json()["id"]
    ann = mc.client(mc.token("ann", "task:read,task:write"))
    shared = agent(api, "echo", pricing=PRICES)["id"]
    before = api.get("/overview").json()["usage"]

    echo_task(ann, shared, 1000, 100, projectId=one)  # 0.00015 + 0.00006
    echo_task(ann, shared, 2000, 0, projectId=one)  # 0.0003
    echo_task(api, shared, 10**6, 10**6, projectId=two)  # 0.75

    assert ann.get(f"/agents/{shared}").json()["usage"] == usage(3000, 100, "0.00051")
    assert api.get(f"/agents/{shared}").json()["usage"] == usage(1003000, 1000100, "0.75051")
    listed = {a["id"]: a["usage"] for a in ann.get("/agents").json()}
    assert listed[shared] == usage(3000, 100, "0.00051")
    assert ann.get("/overview").json()["usage"] == usage(3000, 100, "0.00051")  # ann's projects' runs alone
    ann_key = mc.token("ann", "task:read")
    shown = ok(mc, "overview", token=ann_key).stdout
    assert re.search(r"^usage\s+\$0\.00051 for 3000 prompt \+ 100 completion tokens$", shown, re.M), shown
    everything = api.get("/overview").json()["usage"]
    assert Decimal(everything["costUsd"]) - Decimal(before["costUsd"]) == Decimal("0.75051")
    assert everything["promptTokens"] - before["promptTokens"] == 1003000
    # Tasks show their own usage, in listings too.
    mine = ann.get("/tasks", params={"projectId": one}).json()
    assert sorted(t["usage"]["costUsd"] for t in mine) == ["0.00021", "0.0003"]


LINGERS = textwrap.dedent("""\
    import sys, time
    if sys.stdin.readline().strip() == "linger":
        sys.stderr.write('MC-USAGE {"promptTokens": 5, "completionTokens": 10}\\n')
        sys.stderr.flush()
        time.sleep(60)  # until stopped: the budget is crossed
    sys.stderr.write('MC-USAGE {"promptTokens": 10, "completionTokens": 10}\\n')
    print("done")
""")


def budgeted_exec(api, tmp_path) -> dict:
    program = tmp_path / "lingers.py"
    program.write_text(LINGERS)
    return agent(api, "exec", argv=[sys.executable, str(program)], pricing=DOLLAR_A_MILLION, budgetUsd="0.00003")


def crosses_then_refuses(api, budgeted: dict, **task_fields) -> None:
    """$0.00002 spent of 0.00003; then a run that reports $0.000015 is stopped mid-run, and the agent,
    $0.000035 spent, takes no more runs until its budget is raised."""
    first = start(api, budgeted["id"], "finish", "prompt", **task_fields)
    assert until_status(api, first["id"])["status"] == "done"
    crossing = start(api, budgeted["id"], "linger", "prompt", **task_fields)
    stopped = until_status(api, crossing["id"], timeout=30)  # well before the program's 60 s
    assert stopped["status"] == "failed", stopped
    (failed,) = events(api, crossing["id"], "task.failed")
    assert failed["payload"]["reason"] == "error"
    assert "budget" in failed["payload"]["error"] and "$0.000015" in failed["payload"]["error"], failed
    assert failed["payload"]["usage"] == {"promptTokens": 5, "completionTokens": 10, "costUsd": "0.000015"}
    assert api.get(f"/agents/{budgeted['id']}").json()["usage"] == usage(15, 20, "0.000035")

    third = api.post("/tasks", json={"type": "prompt", "content": "finish", **task_fields}).json()
    with log_unchanged(api):
        for body in ({"agentId": budgeted["id"]}, {"agentId": budgeted["id"], "queue": True}):
            refused(api.post(f"/tasks/{third['id']}/run", json=body), 409, "budget_exceeded",
                    mentions=("budget", "$0.000035", "$0.00003"))
    raised = api.patch(f"/agents/{budgeted['id']}", json={"config": {**budgeted["config"], "budgetUsd": "1"}})
    assert raised.status_code == 200, raised.text
    assert api.post(f"/tasks/{third['id']}/run", json={"agentId": budgeted["id"]}).status_code == 200
    assert until_status(api, third["id"])["status"] == "done"


def test_a_budget_stops_the_run_that_crosses_it_and_refuses_the_next(api, tmp_path):
    crosses_then_refuses(api, budgeted_exec(api, tmp_path))


def test_a_remote_worker_reports_usage_and_stops_at_the_budget_the_same_way(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    client = server.client()
    with Worker(server, "box", tmp_path / "box", agents="exec").start():
        budgeted = budgeted_exec(client, tmp_path)
        crosses_then_refuses(client, budgeted, desktopId="box")
    runs = [r for task in client.get("/tasks", params={"desktopId": "box", "archived": "all"}).json()
            for r in client.get(f"/tasks/{task['id']}/runs").json()]
    assert {r["desktopId"] for r in runs} == {"box"}


def test_an_openai_run_whose_per_chunk_usage_crosses_the_budget_is_stopped_mid_stream(api, provider):
    # 10 prompt tokens, then one more completion token a chunk, at $1 a million: the budget of
    # $0.00002 is crossed at the chunk reporting 11 completion tokens.
    budgeted = agent(api, "openai", baseUrl=provider.url, model="meter-every-chunk", apiKeyEnv=KEY_VARIABLE,
                     pricing=DOLLAR_A_MILLION, budgetUsd="0.00002")
    started = start(api, budgeted["id"], "Talk", "prompt")
    failed = until_status(api, started["id"])
    assert failed["status"] == "failed" and "budget" in failed["error"], failed
    assert provider.disconnected.wait(10), "the stream went on after the budget was crossed"
    (ended,) = events(api, started["id"], "task.failed")
    assert ended["payload"]["usage"] == {"promptTokens": 10, "completionTokens": 11, "costUsd": "0.000021"}
    assert output(api, started["id"]) == "word " * 10  # the chunk that crossed it is not passed on


def test_a_queued_run_whose_agent_has_spent_its_budget_fails_at_its_turn_rather_than_wait():
    spent = Agent(id="g", name="capped", kind="echo", config={"budgetUsd": "2"}, created_at="2026-01-01T00:00:00Z")
    queued = TaskState(id="t", type="prompt", content="x", project_id="p", created_by="u", created_at="2026",
                       status="queued", run_id="r", agent_id="g")
    dispatch = DispatchRun(agent=spent, running=0, limit=5, dependencies={}, desktops=[], now="2026-01-01T00:00:00Z",
                           spent_usd="2")
    (failed,) = decide(queued, dispatch)
    assert isinstance(failed, t.TaskFailed) and (failed.reason, failed.run_id) == ("error", "r")
    assert "budget" in failed.error
    pending = TaskState(id="t", type="prompt", content="x", project_id="p", created_by="u", created_at="2026")
    start_ = StartRun(run_id="r", agent=spent, agent_id="g", actor="u", actor_is_admin=True, running=0, limit=5,
                      dependencies={}, queue=True, spent_usd="1.99")
    assert decide(pending, start_)  # below its budget it is queued (no desktop here)
    with pytest.raises(Refused) as over:
        decide(pending, msgspec.structs.replace(start_, spent_usd="2"))
    assert over.value.code == "budget_exceeded"
