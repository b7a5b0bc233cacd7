"""Rebuilding the read models from the log gives the very models the live projector kept,
and /readyz answers 503 while the read models lag the log."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from events import Meta, open_log
from events import types as t
from tests.api_helpers import wait_for
from tests.audit_sqlite import as_an_older_release_left_it, database, read_models, recorded
from tests.audit_tools import differences, with_terminal_stderr

COMMANDS = 600


class Driver:
    """Random commands through the API, as many clients would send them; refusals (409, 429,
    503 for a paused agent) are part of the sequence."""

    def __init__(self, client: httpx.Client, seed: int):
        self.client, self.random = client, random.Random(seed)
        self.spend = random.Random(seed + 1)
        """Usage and prices: drawn apart, so the commands' sequence does not depend on them."""
        self.tasks: list[str] = []
        self.agents: list[str] = []
        self.projects: list[str] = []

    def send(self, method: str, path: str, **options) -> httpx.Response:
        response = self.client.request(method, path, **options)
        # API.md: a 5xx other than 503 (a paused agent, shutting down) is a bug.
        assert response.status_code < 500 or response.status_code == 503, f"{method} {path}: {response.text}"
        return response

    def task(self) -> str | None:
        return self.random.choice(self.tasks) if self.tasks else None

    def step(self) -> None:
        r = self.random
        action = r.choice([
            self.create, self.create, self.run, self.run, self.cancel, self.retry, self.review, self.message,
            self.patch, self.archive, self.presence, self.project, self.agent,
        ])
        action()

    def create(self) -> None:
        r = self.random
        echo = r.choice([{}, {"fail": "boom"}, {"ask": "sure?"}, {"chunks": r.randint(1, 5)}, {"delayMs": 30}])
        spend = self.spend
        if spend.random() < 0.5:  # what a provider would report, priced when the agent has prices
            echo["usage"] = {"promptTokens": spend.randint(0, 10**6), "completionTokens": spend.randint(0, 10**5)}
        body = {"type": "prompt", "content": f"job {r.random()}", "title": r.choice([None, "a", "b"]),
                "requiresApproval": r.random() < 0.3, "priority": r.randint(1, 10), "metadata": {"echo": echo},
                "desktopId": r.choice([None, "local", "elsewhere"])}  # elsewhere: no such desktop, its runs 503
        if self.projects and r.random() < 0.3:
            body["projectId"] = r.choice(self.projects)
        created = self.send("POST", "/tasks", json=body)
        if created.status_code == 201:
            self.tasks.append(created.json()["id"])

    def run(self) -> None:
        if task := self.task():
            body = {"agentId": self.random.choice(self.agents)} if self.agents and self.random.random() < 0.2 else None
            self.send("POST", f"/tasks/{task}/run", json=body)

    def cancel(self) -> None:
        if task := self.task():
            self.send("POST", f"/tasks/{task}/cancel", json={"reason": "changed my mind"})

    def retry(self) -> None:
        if task := self.task():
            self.send("POST", f"/tasks/{task}/retry")

    def review(self) -> None:
        if task := self.task():
            decision = self.random.choice(["approve", "reject"])
            self.send("POST", f"/tasks/{task}/review", json={"decision": decision, "feedback": "noted"})

    def message(self) -> None:
        if task := self.task():
            self.send("POST", f"/tasks/{task}/messages", json={"message": "yes"})

    def patch(self) -> None:
        if task := self.task():
            field = self.random.choice([{"title": "renamed"}, {"priority": 9}, {"metadata": {"k": 1}}])
            self.send("PATCH", f"/tasks/{task}", json=field)

    def archive(self) -> None:
        if task := self.task():
            if self.random.random() < 0.5:
                self.send("DELETE", f"/tasks/{task}")
            else:
                self.send("PATCH", f"/tasks/{task}", json={"archived": False})

    def presence(self) -> None:
        if task := self.task():
            device = self.random.choice(["phone", "laptop"])
            method = self.random.choice(["POST", "DELETE"])
            self.send(method, f"/tasks/{task}/presence", json={"deviceId": device})

    def project(self) -> None:
        if self.projects and self.random.random() < 0.5:
            self.send("PATCH", f"/projects/{self.random.choice(self.projects)}", json={"context": "updated"})
        else:
            self.projects.append(self.send("POST", "/projects", json={"name": f"p{len(self.projects)}"}).json()["id"])

    def agent(self) -> None:
        if self.agents and self.random.random() < 0.6:
            agent = self.random.choice(self.agents)
            self.send("POST", f"/agents/{agent}/{self.random.choice(['pause', 'resume'])}")
        else:
            pricing = {"promptPerMillion": f"{self.spend.randint(0, 300) / 100}", "completionPerMillion": "0.6"}
            body = {"name": f"e{len(self.agents)}", "kind": "echo", "config": {"pricing": pricing}}
            self.agents.append(self.send("POST", "/agents", json=body).json()["id"])

    def finish(self) -> None:
        """End every run still going, so the log stops moving."""

        def quiet() -> bool:
            active = self.client.get("/tasks", params={"status": "running,awaiting_input", "archived": "all"}).json()
            for task in active:
                if task["status"] == "awaiting_input":
                    self.send("POST", f"/tasks/{task['id']}/cancel")
            return not active

        wait_for(quiet, 30, "every run to end")


@pytest.mark.sqlite_file  # reads or holds the SQLite file itself
def test_rebuilt_read_models_equal_the_live_ones(make_app_server, tmp_path):
    server = make_app_server(MC_RATE_LIMIT_PER_SECOND="0")  # the driver is a busy client, not the subject
    driver = Driver(server.client(), seed=7)
    for _ in range(COMMANDS):
        driver.step()
    driver.finish()
    server.stop()

    db = database(server.data_dir)
    live, head = read_models(db), len(recorded(db))
    assert len(live["tasks"]) > 100 and live["approvals"] and live["presence"] and live["agents"]
    assert len(live["usage_shares"]) > 1  # the unpriced echo agent's and a priced one's

    status, shown = with_terminal_stderr(server.data_dir, "rebuild", stdout=tmp_path / "rebuilt")
    assert status == 0 and "rebuilding read models" in shown
    assert (tmp_path / "rebuilt").read_text() == f"rebuilt every read model from {head} events\n"
    assert not differences(read_models(db), live)
    assert len(recorded(db)) == head  # a rebuild appends nothing


@pytest.mark.sqlite_file  # reads or holds the SQLite file itself
def test_read_models_an_older_release_kept_are_rebuilt_once_with_what_it_did_not_keep(make_app_server):
    server = make_app_server()
    client = server.client()
    echo = client.post("/agents", json={"name": "priced", "kind": "echo", "config": {"pricing": {
        "promptPerMillion": "2", "completionPerMillion": "3"}}}).json()["id"]
    for usage in ({"promptTokens": 10, "completionTokens": 1}, None):
        task = client.post("/tasks", json={"type": "prompt", "content": "x", "metadata": {"echo": {"usage": usage}}}).json()
        assert client.post(f"/tasks/{task['id']}/run", json={"agentId": echo}).status_code == 200
        wait_for(lambda: client.get(f"/tasks/{task['id']}").json()["status"] == "done", what="the run to end")
    kept = client.get(f"/agents/{echo}").json()["usage"]
    assert kept == {"promptTokens": 10, "completionTokens": 1, "costUsd": "0.000023", "unpricedRuns": 1}
    server.stop()
    db = database(server.data_dir)
    live = read_models(db)

    as_an_older_release_left_it(db, "usage_shares")
    server.start()
    assert server.client().get(f"/agents/{echo}").json()["usage"] == kept
    rebuilt = read_models(db)  # the restart has appended since (its desktop online), not to these
    assert (rebuilt["usage_shares"], rebuilt["tasks"]) == (live["usage_shares"], live["tasks"])


async def _append_without_projector(db, count: int) -> None:
    """What an older tool or a script with `events.open_log(path)` does: append, fold nothing."""
    log = open_log(str(db))
    await log.open()
    try:
        await log.append("project-elsewhere", [t.ProjectCreated(project_id="elsewhere", name="elsewhere")],
                         meta=Meta(actor="script"))
        for n in range(count):
            await log.append(f"task-bulk{n}", [t.TaskCreated(
                task_id=f"bulk{n}", type="prompt", content="from a script", project_id="elsewhere",
                created_by="script")])
    finally:
        await log.close()


@pytest.mark.sqlite_file  # reads or holds the SQLite file itself
def test_readyz_is_503_while_the_read_models_lag_the_log(server):
    # A server's startup folds any backlog before it listens (uvicorn binds after the
    # lifespan), so the lag is observable only with a server already running.
    assert httpx.get(server.base_url + "/readyz").status_code == 200
    asyncio.run(_append_without_projector(database(server.data_dir), 50))

    lagging = httpx.get(server.base_url + "/readyz")
    assert lagging.status_code == 503
    assert lagging.json()["ready"] is False
    assert lagging.json()["projected"] < lagging.json()["head"]

    # Asking for readiness folds the backlog, so the instance comes back on its own.
    caught_up = wait_for(lambda: (r := httpx.get(server.base_url + "/readyz")).status_code == 200 and r, 20,
                         "readiness to return")
    assert caught_up.json()["projected"] == caught_up.json()["head"]
    assert server.client().get("/tasks", params={"search": "from a script"}).headers["X-Total-Count"] == "50"
