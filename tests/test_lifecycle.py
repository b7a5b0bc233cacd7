"""The task's state machine, pure: `decide` and `evolve` for every (status, command) pair, with
no log and no server.

The pairs come from the state machine's table (projections/lifecycle.py); what each must do is
written out below by hand from the documented lifecycle, so a wrong table fails here."""

from __future__ import annotations

from typing import get_args

import pytest

from events import Event
from events import types as t
from projections import lifecycle
from projections.agents import AGENT_KINDS, Agent
from projections.tasks import Task, evolve
from service.http import openapi
from service.work.agents.kinds import KINDS
from service.app import create_app
from service.commands.deciders import (
    ArchiveTask, CancelTask, Code, Command, FailRun, FinishRun, RecordOutput, Refused, RequestInput,
    RetryTask, Review, RunOver, SendMessage, StartRun, UpdateTask, decide,
)
from service.api import API_PREFIX
from service.http.errors import REFUSALS, refusal_response
from service.settings import Settings

TASK, RUN, APPROVAL = "task-1", "run-1", "approval-1"

# Each status as a history reaches it.
HISTORIES: dict[str, list[t.EventData]] = {
    "pending": [],
    "running": [t.TaskStarted(task_id=TASK, run_id=RUN, agent_id="agent")],
    "awaiting_input": [
        t.TaskStarted(task_id=TASK, run_id=RUN, agent_id="agent"),
        t.TaskInputRequested(task_id=TASK, run_id=RUN, prompt="which one?"),
    ],
    "review": [
        t.TaskStarted(task_id=TASK, run_id=RUN, agent_id="agent"),
        t.TaskReview(task_id=TASK, run_id=RUN, result="the deliverable"),
        t.ApprovalCreated(approval_id=APPROVAL, task_id=TASK, run_id=RUN),
    ],
    "done": [
        t.TaskStarted(task_id=TASK, run_id=RUN, agent_id="agent"),
        t.TaskCompleted(task_id=TASK, run_id=RUN, result="the deliverable"),
    ],
    "failed": [
        t.TaskStarted(task_id=TASK, run_id=RUN, agent_id="agent"),
        t.TaskFailed(task_id=TASK, run_id=RUN, reason="exit", error="exit 1", exit_code=1),
    ],
    "cancelled": [t.TaskCancelled(task_id=TASK)],
}

ECHO = Agent(id="agent", name="echo", kind="echo", created_at="2026-01-01T00:00:00Z")


def start(agent: Agent = ECHO, admin: bool = False, running: int = 0) -> StartRun:
    """A run asked by alice, with `running` of 5 run slots taken."""
    return StartRun(run_id="run-2", agent=agent, agent_id=agent.id, actor="alice", actor_is_admin=admin,
                    running=running, limit=5, dependencies={})

# One command of each kind the table names.
COMMANDS: dict[str, Command] = {
    "edit": UpdateTask(changes={"content": "something else"}),
    "annotate": UpdateTask(changes={"title": "a title"}),
    "archive": ArchiveTask(archived=True),
    "run": start(),
    "cancel": CancelTask(reason="not needed"),
    "retry": RetryTask(),
    "message": SendMessage(message="the second one"),
    "review": Review(decision="approve"),
    "output": RecordOutput(run_id=RUN, chunks=[(1, "text", "hello")]),
    "ask": RequestInput(run_id=RUN, prompt="sure?"),
    "finish": FinishRun(run_id=RUN, approval_id="approval-2", result="the deliverable"),
    "fail": FailRun(run_id=RUN, reason="error", error="boom"),
}

# What each command does in each status. A cell is the event types recorded (without `task.`,
# joined by +) and, after >, the status they lead to when it changes; 409 is a refusal for the
# status (invalid_status), `over` the runner's report on a run that is not going (run_over),
# and `-` nothing recorded, nothing refused.
EXPECTED = """
          pending              running                         awaiting_input                  review                               done      failed           cancelled
edit      updated              409                             409                             409                                  409       409              409
annotate  updated              updated                         updated                         updated                              updated   updated          updated
archive   archived             archived                        archived                        archived                             archived  archived         archived
run       started>running      409                             409                             409                                  409       409              409
cancel    cancelled>cancelled  cancelled>cancelled             cancelled>cancelled             409                                  409       409              -
retry     409                  409                             409                             409                                  409       retried>pending  retried>pending
message   409                  message                         message>running                 409                                  409       409              409
review    409                  409                             409                             approval.resolved+completed>done     409       409              409
output    over                 output                          output                          over                                 over      over             over
ask       over                 input_requested>awaiting_input  input_requested                 over                                 over      over             over
finish    over                 completed>done                  failed>failed                   over                                 over      over             over
fail      over                 failed>failed                   failed>failed                   over                                 over      over             over
"""


def _grid() -> dict[tuple[str, str], str]:
    header, *rows = [line.split() for line in EXPECTED.strip().splitlines()]
    return {(status, row[0]): cell for row in rows for status, cell in zip(header, row[1:], strict=True)}


GRID = _grid()


def test_the_expectations_cover_every_status_and_every_command_of_the_table():
    assert {status for status, _ in GRID} == set(lifecycle.STATUSES) == set(get_args(lifecycle.Status))
    assert {command for _, command in GRID} == set(lifecycle.ADMITS) == set(get_args(lifecycle.Command))
    assert set(COMMANDS) == set(lifecycle.ADMITS)


def _event(data: t.EventData, version: int) -> Event:
    return Event(data, version, f"task-{TASK}", version, f"2026-01-01T00:00:{version:02}Z", "alice")


def _fold(task: Task | None, events: list[t.EventData]) -> Task | None:
    for data in events:
        task = evolve(task, _event(data, (task.version if task else 0) + 1))
    return task


def task_in(status: str, **created) -> Task:
    fields = {"type": "prompt", "content": "hello", "project_id": "project", "created_by": "alice"}
    task = _fold(None, [t.TaskCreated(task_id=TASK, **(fields | created)), *HISTORIES[status]])
    assert task is not None and task.status == status
    return task


def _short(event_type: str) -> str:
    return event_type.removeprefix("task.")


@pytest.mark.parametrize(("status", "command"), sorted(GRID))
def test_decide_and_evolve(status: str, command: str):
    expected = GRID[status, command]
    task = task_in(status)
    if expected in ("409", "over"):
        with pytest.raises(Refused) as refused:
            decide(task, COMMANDS[command])
        assert refused.value.code == {"409": "invalid_status", "over": "run_over"}[expected]
        assert status in refused.value.detail or expected == "over"  # the sentence names the status
        return
    events = decide(task, COMMANDS[command])
    names, _, leads_to = expected.partition(">")
    assert "+".join(_short(e.event_type) for e in events) == ("" if names == "-" else names)
    after = _fold(task, events)
    assert after is not None and after.status == (leads_to or status)
    assert after.version == task.version + len(events)


def test_the_refusal_for_a_status_names_the_statuses_that_would_do():
    with pytest.raises(Refused) as refused:
        decide(task_in("done"), CancelTask())
    assert refused.value.detail == "Cannot cancel a task that is done; it must be pending, running or awaiting_input."


def test_a_report_on_a_run_that_is_over_is_its_own_refusal_the_runner_drops():
    running = task_in("running")
    with pytest.raises(RunOver):
        decide(running, RecordOutput(run_id="an-earlier-run", chunks=[(1, "text", "late")]))


def test_rejecting_a_review_fails_the_task():
    events = decide(task_in("review"), Review(decision="reject", feedback="too short"))
    assert [e.event_type for e in events] == ["approval.resolved", "task.failed"]
    failed = _fold(task_in("review"), events)
    assert failed is not None and (failed.status, failed.error) == ("failed", "rejected: too short")


def test_finishing_a_run_that_needs_approval_opens_a_review():
    running = _fold(task_in("pending", requires_approval=True), HISTORIES["running"])
    events = decide(running, COMMANDS["finish"])
    assert [e.event_type for e in events] == ["task.review", "approval.created"]
    reviewed = _fold(running, events)
    assert reviewed is not None and (reviewed.status, reviewed.approval_id) == ("review", "approval-2")


def test_an_approved_review_completes_with_the_run_s_deliverable():
    events = decide(task_in("review"), Review(decision="approve"))
    assert events[-1] == t.TaskCompleted(task_id=TASK, run_id=RUN, result="the deliverable")


def test_a_completion_without_a_result_after_review_keeps_the_reviewed_deliverable():
    """Logs written before completions through an approval carried the result hold a null one."""
    old = [t.ApprovalResolved(approval_id=APPROVAL, task_id=TASK, decision="approve"),
           t.TaskCompleted(task_id=TASK, run_id=RUN)]
    done = _fold(task_in("review"), old)
    assert done is not None and (done.status, done.result) == ("done", "the deliverable")


# --- agent kinds -------------------------------------------------------------------

RUNS_ON = {("command", "shell"), ("command", "echo"), ("prompt", "exec"), ("prompt", "openai"), ("prompt", "echo")}
RUN_AS_THE_SERVICE = {"shell", "exec"}
"""Kinds whose runs are programs on this machine: only admins and `allowedUsers` may use them."""


def test_every_agent_kind_has_a_policy_and_a_function_that_runs_it():
    assert set(AGENT_KINDS) == set(KINDS) == set(get_args(t.AgentKind))


@pytest.mark.parametrize("task_type", get_args(t.TaskType))
@pytest.mark.parametrize("kind", get_args(t.AgentKind))
def test_which_task_types_run_on_which_kind(task_type: str, kind: str):
    run = start(Agent(id="agent", name="it", kind=kind, config={"allowedUsers": ["*"]}, created_at=""))
    task = task_in("pending", type=task_type)
    if (task_type, kind) in RUNS_ON:
        assert [e.event_type for e in decide(task, run)] == ["task.started"]
    else:
        with pytest.raises(Refused) as refused:
            decide(task, run)
        assert refused.value.code == "agent_mismatch"


@pytest.mark.parametrize("kind", get_args(t.AgentKind))
def test_only_admins_and_allowed_users_run_tasks_on_kinds_that_run_programs(kind: str):
    agent = Agent(id="agent", name="it", kind=kind, created_at="")
    task = task_in("pending", type="command" if kind == "shell" else "prompt")
    assert [e.event_type for e in decide(task, start(agent, admin=True))] == ["task.started"]
    if kind in RUN_AS_THE_SERVICE:
        with pytest.raises(Refused) as refused:
            decide(task, start(agent))
        assert refused.value.code == "forbidden"
    else:
        assert [e.event_type for e in decide(task, start(agent))] == ["task.started"]


# --- refusals at the HTTP edge -------------------------------------------------------


def test_every_refusal_code_has_an_http_status():
    assert set(REFUSALS) == set(get_args(Code))


def test_the_concurrency_limit_answers_429_with_retry_after():
    with pytest.raises(Refused) as refused:
        decide(task_in("pending"), start(running=5))
    response = refusal_response(refused.value)
    assert (response.status_code, response.headers["Retry-After"]) == (429, "5")
    assert b'"code":"concurrency_limit"' in response.body


def test_the_openapi_document_names_the_statuses_each_task_operation_needs():
    paths = openapi.build(create_app(Settings()).routes)["paths"]

    def conflict(path: str) -> str:
        return paths[f"{API_PREFIX}{path}"]["post"]["responses"]["409"]["description"]

    assert conflict("/tasks/{task_id}/run").startswith("The task's status is not pending,")
    assert conflict("/tasks/{task_id}/cancel").startswith("The task's status is not pending, running or awaiting_input,")
    assert conflict("/tasks/{task_id}/retry").startswith("The task's status is not failed or cancelled,")
    assert conflict("/tasks/{task_id}/messages").startswith("The task's status is not running or awaiting_input,")
    assert conflict("/approvals/{approval_id}/resolve").startswith("The task's status is not review,")
