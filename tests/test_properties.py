"""Random command sequences against the service; after every step the read models equal a
fresh fold of the log, and the overview equals counting the tasks.

It drives the whole app in this process (`api_server`, module-scoped), under its lifespan: the
runner, the projector in the append transaction and the HTTP layer from the middleware on are
what a user runs, and one app for all examples keeps the test quick. Examples need no fresh one:
each checks its own tasks and approvals, and the overview's change since it began, so a failure
shrinks to the steps of one example; the whole log is checked once more at the end.
Besides the invariant, each command's answer is checked against the state machine of API.md.
"""


import uuid
from collections import Counter
from datetime import UTC, datetime

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from projections.lifecycle import ACTIVE
from projections.tasks import served as as_served
from tests.api_helpers import Fold, as_json, device, wait_for

MAX_CONCURRENT = 5  # the server's default
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
BEHAVIOURS = {
    "completes": {},
    "fails": {"fail": "as asked"},
    "asks": {"ask": "which?"},
}


def _live_watchers(fold: Fold, task_id: str, now: datetime) -> list[str] | None:
    """Devices with live presence; None when a mark expires so close to `now` that the server
    may have judged it either way."""
    devices = []
    for presence in fold.presence.values():
        if presence.task_id != task_id:
            continue
        expires = datetime.fromisoformat(presence.expires_at)
        if abs((expires - now).total_seconds()) < 2:
            return None
        if expires > now:
            devices.append(presence.device_id)
    return sorted(devices)


class TaskCommands(RuleBasedStateMachine):
    client: httpx.Client
    fold: Fold

    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.c = self.client
        self.echo: dict[str, dict] = {}
        for name in ("laptop", "phone"):  # presence is marked from registered devices only
            device(self.c, name)

    # --- what the state machine expects, from the fold (the system is settled between steps) ---

    def status(self, task_id: str) -> str:
        return self.fold.tasks[task_id].status

    def active(self) -> int:
        return sum(t.status in ACTIVE for t in self.fold.tasks.values())

    def expect(self, response: httpx.Response, status: int) -> None:
        request = response.request
        assert response.status_code == status, (
            f"{request.method} {request.url}: {response.status_code} {response.text[:300]}, expected {status}"
        )

    # --- commands ---------------------------------------------------------------------------

    @rule(target=tasks, behaviour=st.sampled_from(sorted(BEHAVIOURS)), approval=st.booleans(),
          desk=st.sampled_from([None, "local"]), title=st.none() | TEXT, priority=st.integers(1, 10))
    def create(self, behaviour, approval, desk, title, priority):
        echo = BEHAVIOURS[behaviour]
        response = self.c.post("/tasks", json={
            "type": "prompt", "content": f"task {uuid.uuid4().hex[:6]}", "title": title, "desktopId": desk,
            "requiresApproval": approval, "priority": priority, "metadata": {"echo": echo},
        })
        self.expect(response, 201)
        self.echo[response.json()["id"]] = echo
        return response.json()["id"]

    @rule(task=tasks)
    def run(self, task):
        if self.status(task) != "pending":
            expected = 409
        else:
            expected = 429 if self.active() >= MAX_CONCURRENT else 200
        self.expect(self.c.post(f"/tasks/{task}/run"), expected)

    @rule(task=tasks, reason=st.none() | TEXT)
    def cancel(self, task, reason):
        ok = self.status(task) in ("pending", "running", "awaiting_input", "cancelled")
        self.expect(self.c.post(f"/tasks/{task}/cancel", json={"reason": reason}), 200 if ok else 409)

    @rule(task=tasks)
    def retry(self, task):
        self.expect(self.c.post(f"/tasks/{task}/retry"), 200 if self.status(task) in ("failed", "cancelled") else 409)

    @rule(task=tasks, decision=st.sampled_from(["approve", "reject"]), feedback=st.none() | TEXT)
    def review(self, task, decision, feedback):
        response = self.c.post(f"/tasks/{task}/review", json={"decision": decision, "feedback": feedback})
        self.expect(response, 200 if self.status(task) == "review" else 409)

    @rule(task=tasks, decision=st.sampled_from(["approve", "reject"]))
    def resolve(self, task, decision):
        approvals = [a for a in self.fold.approvals.values() if a.task_id == task]
        if not approvals:
            self.expect(self.c.post(f"/approvals/{uuid.uuid4()}/resolve", json={"decision": decision}), 404)
            return
        latest = max(approvals, key=lambda a: a.created_position)
        response = self.c.post(f"/approvals/{latest.id}/resolve", json={"decision": decision})
        self.expect(response, 200 if latest.status == "pending" else 409)

    @rule(task=tasks, message=TEXT.filter(bool))
    def message(self, task, message):
        live = self.status(task) in ACTIVE
        self.expect(self.c.post(f"/tasks/{task}/messages", json={"message": message}), 202 if live else 409)

    @rule(task=tasks, field=st.sampled_from(["title", "metadata", "archived", "priority", "description"]),
          text=TEXT, number=st.integers(1, 10), flag=st.booleans())
    def patch(self, task, field, text, number, flag):
        value = {"title": text, "metadata": {"echo": self.echo[task], "note": text}, "archived": flag,
                 "priority": number, "description": text}[field]
        current = self.fold.tasks[task]
        restricted = field in ("priority", "description") and getattr(current, field) != value
        ok = not restricted or current.status == "pending"
        self.expect(self.c.patch(f"/tasks/{task}", json={field: value}), 200 if ok else 409)

    @rule(task=tasks)
    def archive(self, task):
        self.expect(self.c.delete(f"/tasks/{task}"), 204)

    @rule(task=tasks, device=st.sampled_from(["laptop", "phone"]), present=st.booleans())
    def presence(self, task, device, present):
        path = f"/tasks/{task}/presence"
        if present:
            response = self.c.post(path, json={"deviceId": device})
        else:
            response = self.c.delete(path, params={"deviceId": device})
        self.expect(response, 204)

    # --- the invariant ----------------------------------------------------------------------------

    @invariant()
    def read_models_equal_the_fold(self):
        # Each example checks its own tasks, and the overview's change since it began: a bug then
        # shows in the example that causes it, so hypothesis can shrink it to its few steps.
        # The whole log is compared once more at the end of the test.
        if self.baseline is None:
            settle(self.c)
            self.baseline = self.c.get("/overview").json()
        check(self.c, self.fold, set(self.echo), self.baseline)

    baseline: dict | None = None

    def teardown(self):
        # Free the run slots this example still holds (tasks waiting for an answer).
        for task_id in self.echo:
            if self.fold.tasks[task_id].status in ACTIVE:
                self.c.post(f"/tasks/{task_id}/cancel")


def check(c: httpx.Client, fold: Fold, mine: set[str] | None = None, baseline: dict | None = None) -> None:
    """The read models (GET /tasks, /approvals, /overview) against the fold of the log, for the
    tasks in `mine` (every task if None); the overview less `baseline`, the overview before them."""
    settle(c)
    for _ in range(5):
        head = fold.catch_up(c)
        listed = _all_tasks(c)
        approvals = c.get("/approvals", params={"status": "all"}).json()
        overview = c.get("/overview").json()
        now = datetime.now(UTC)
        if fold.catch_up(c) == head:  # nothing moved while reading: one consistent view
            break
    else:
        raise AssertionError("the log kept moving after the runs had settled")

    def ours(task_id: str) -> bool:
        return mine is None or task_id in mine

    listed = [t for t in listed if ours(t["id"])]
    expected_tasks = sorted((t for t in fold.tasks.values() if ours(t.id)), key=lambda t: -t.created_position)
    assert [t["id"] for t in listed] == [t.id for t in expected_tasks]  # newest first
    for served, folded in zip(listed, expected_tasks):
        watchers = _live_watchers(fold, folded.id, now)
        expected = as_json(as_served(folded))
        expected["watchers"] = watchers if watchers is not None else sorted(served["watchers"])
        assert {**served, "watchers": sorted(served["watchers"])} == expected

    expected_approvals = [
        {"id": a.id, "taskId": a.task_id, "status": a.status, "createdAt": a.created_at,
         "resolvedAt": a.resolved_at, "resolvedBy": a.resolved_by, "feedback": a.feedback, "artifacts": a.artifacts,
         "task": {k: as_json(fold.tasks[a.task_id])[k] for k in ("id", "type", "content", "desktopId", "title")}}
        for a in sorted(fold.approvals.values(), key=lambda a: a.created_position)  # oldest first
        if ours(a.task_id)
    ]
    assert [a for a in approvals if ours(a["taskId"])] == expected_approvals

    # The overview equals counting the tasks (and approvals, and the desktops online).
    before = baseline or {"tasks": {}, "approvalsPending": 0}
    counted = Counter(t["status"] for t in listed)
    assert {s: n - before["tasks"].get(s, 0) for s, n in overview["tasks"].items()} == {
        s: counted[s] for s in overview["tasks"]
    }
    pending = sum(a.status == "pending" for a in fold.approvals.values() if ours(a.task_id))
    assert overview["approvalsPending"] - before["approvalsPending"] == pending
    assert overview["activeDesktops"] == sum(d.status == "online" for d in fold.desktops.values())
    assert overview["log"]["head"] == head


def settle(c: httpx.Client) -> None:
    """Runs finish on their own (the echo agent needs milliseconds): waits until none is running."""
    wait_for(lambda: c.get("/tasks", params={"status": "running", "archived": "all", "limit": 1})
             .headers["x-total-count"] == "0", what="runs to settle")


def _all_tasks(c: httpx.Client) -> list[dict]:
    found, offset = [], 0
    while True:
        page = c.get("/tasks", params={"archived": "all", "limit": 500, "offset": offset})
        assert page.status_code == 200
        found += page.json()
        if len(found) >= int(page.headers["x-total-count"]):
            return found
        offset += 500


def test_read_models_equal_a_fold_of_the_log(api_server):
    TaskCommands.client = api_server.client()
    TaskCommands.fold = Fold()  # shared by the examples: the log is one, and the fold is incremental
    run_state_machine_as_test(TaskCommands, settings=settings(
        max_examples=15, stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ))
    check(TaskCommands.client, TaskCommands.fold)  # every task of every example, against the whole log
