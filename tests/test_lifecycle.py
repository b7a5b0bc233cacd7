"""The task's state machine, pure: `decide` and `evolve` for every (status, command) pair, with
no log and no server.

The pairs come from the state machine's table (projections/lifecycle.py); what each must do is
written out below by hand from the documented lifecycle, so a wrong table fails here."""

from __future__ import annotations

from typing import get_args

import msgspec
import pytest

from events import Event
from events import types as t
from projections import lifecycle
from projections.agents import AGENT_KINDS, Agent
from projections.desktops import Placement
from projections.runs import OUTPUT_FREE, runs
from projections.tasks import Task, evolve, served
from projections.usage import Usage
from service.http import openapi
from service.work.agents.kinds import KINDS
from service.app import create_app
from service.commands.deciders import (
    ArchiveTask, CancelTask, Code, Command, DispatchRun, FailRun, Fence, FinishRun, LoseRun, OutputGap, RecordOutput,
    Refused, Renew, RequestInput, RetryTask, Review, RunOver, SendMessage, StartRun, UpdateTask, decide,
)
from service.api import API_PREFIX
from service.http.errors import REFUSALS, refusal_response
from service.settings import Settings

TASK, RUN, APPROVAL = "task-1", "run-1", "approval-1"
DESKTOP, EPOCH = "local", 3
STARTED = t.TaskStarted(task_id=TASK, run_id=RUN, agent_id="agent", desktop_id=DESKTOP, lease_epoch=EPOCH)
LEASE = Fence(desktop_id=DESKTOP, epoch=EPOCH)

# Each status as a history reaches it.
HISTORIES: dict[str, list[t.EventData]] = {
    "pending": [],
    "queued": [t.TaskQueued(task_id=TASK, run_id=RUN, agent_id="agent")],
    "running": [STARTED],
    "awaiting_input": [
        STARTED,
        t.TaskInputRequested(task_id=TASK, run_id=RUN, prompt="which one?"),
    ],
    "review": [
        STARTED,
        t.TaskReview(task_id=TASK, run_id=RUN, result="the deliverable"),
        t.ApprovalCreated(approval_id=APPROVAL, task_id=TASK, run_id=RUN),
    ],
    "done": [
        STARTED,
        t.TaskCompleted(task_id=TASK, run_id=RUN, result="the deliverable"),
    ],
    "failed": [
        STARTED,
        t.TaskFailed(task_id=TASK, run_id=RUN, reason="exit", error="exit 1", exit_code=1),
    ],
    "cancelled": [t.TaskCancelled(task_id=TASK)],
}

ECHO = Agent(id="agent", name="echo", kind="echo", created_at="2026-01-01T00:00:00Z")


LOCAL = Placement(id=DESKTOP, status="online", agents=list(AGENT_KINDS), capacity=5, busy=0, epoch=EPOCH)


def start(agent: Agent = ECHO, admin: bool = False, running: int = 0) -> StartRun:
    """A run asked by alice, with `running` of 5 run slots taken, and one desktop hosting every kind."""
    return StartRun(run_id="run-2", agent=agent, agent_id=agent.id, actor="alice", actor_is_admin=admin,
                    running=running, limit=5, dependencies={}, desktops=[LOCAL])

# One command of each kind the table names.
COMMANDS: dict[str, Command] = {
    "edit": UpdateTask(changes={"content": "something else"}),
    "prioritise": UpdateTask(changes={"priority": 9}),
    "annotate": UpdateTask(changes={"title": "a title"}),
    "archive": ArchiveTask(archived=True),
    "run": start(),
    "cancel": CancelTask(reason="not needed"),
    "retry": RetryTask(),
    "message": SendMessage(message="the second one"),
    "review": Review(decision="approve"),
    "dispatch": DispatchRun(agent=ECHO, running=0, limit=5, dependencies={}, desktops=[LOCAL],
                            now="2026-01-01T00:01:00Z"),
    "output": RecordOutput(run_id=RUN, chunks=[(1, "text", "hello")], fence=LEASE),
    "ask": RequestInput(run_id=RUN, prompt="sure?", number=1, fence=LEASE),
    "finish": FinishRun(run_id=RUN, approval_id="approval-2", result="the deliverable", fence=LEASE),
    "fail": FailRun(run_id=RUN, reason="error", error="boom", fence=LEASE),
    "renew": Renew(run_id=RUN, fence=LEASE),
    "lose": LoseRun(run_id=RUN, epoch=EPOCH, error="Desktop local stopped reporting on this run."),
}

# What each command does in each status. A cell is the event types recorded (without `task.`,
# joined by +) and, after >, the status they lead to when it changes; 409 is a refusal for the
# status (invalid_status), `lost` a desktop's report on a run that is not going (lease_lost),
# and `-` nothing recorded, nothing refused. (The awaiting_input history has asked question 1
# already, so asking it there again is a resend.)
EXPECTED = """
            pending              queued                        running                         awaiting_input       review                            done      failed           cancelled
edit        updated              409                           409                             409                  409                               409       409              409
prioritise  updated              updated                       409                             409                  409                               409       409              409
annotate    updated              updated                       updated                         updated              updated                           updated   updated          updated
archive     archived             archived+cancelled>cancelled  archived                        archived             archived                          archived  archived         archived
run         started>running      409                           409                             409                  409                               409       409              409
cancel      cancelled>cancelled  cancelled>cancelled           cancelled>cancelled             cancelled>cancelled  409                               409       409              -
retry       409                  409                           409                             409                  409                               409       retried>pending  retried>pending
message     409                  409                           message                         message>running      409                               409       409              409
review      409                  409                           409                             409                  approval.resolved+completed>done  409       409              409
dispatch    409                  started>running               409                             409                  409                               409       409              409
output      lost                 lost                          output                          output               lost                              lost      lost             lost
ask         lost                 lost                          input_requested>awaiting_input  -                    lost                              lost      lost             lost
finish      lost                 lost                          completed>done                  failed>failed        lost                              lost      lost             lost
fail        lost                 lost                          failed>failed                   failed>failed        lost                              lost      lost             lost
renew       lost                 lost                          -                               -                    lost                              lost      lost             lost
lose        -                    -                             failed>failed                   failed>failed        -                                 -         -                -
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
    if expected in ("409", "lost"):
        with pytest.raises(Refused) as refused:
            decide(task, COMMANDS[command])
        assert refused.value.code == {"409": "invalid_status", "lost": "lease_lost"}[expected]
        assert status in refused.value.detail  # the sentence names the status
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
    assert refused.value.detail == "Cannot cancel a task that is done; it must be pending, queued, running or awaiting_input."


def test_a_report_on_a_run_that_is_over_is_its_own_refusal_the_runner_drops():
    running = task_in("running")
    with pytest.raises(RunOver) as lost:
        decide(running, RecordOutput(run_id="an-earlier-run", chunks=[(1, "text", "late")]))
    assert lost.value.code == "lease_lost"


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


# --- the lease's fence and the reports' numbering ------------------------------------

def _output(*seqs: int) -> list[tuple[int, str, str]]:
    return [(seq, "stdout", f"line {seq}\n") for seq in seqs]


def running_with_output(*seqs: int) -> Task:
    task = _fold(task_in("running"), [t.TaskOutput(task_id=TASK, run_id=RUN, seq=n, stream="stdout", chunk="x")
                                      for n in seqs])
    assert task is not None
    return task


REPORTS: dict[str, Command] = {
    "output": COMMANDS["output"], "ask": COMMANDS["ask"], "finish": COMMANDS["finish"],
    "fail": COMMANDS["fail"], "renew": COMMANDS["renew"],
}

FENCES = {  # a fence, and the words the refusal must say (None: accepted)
    "the run's own": (LEASE, None),
    "none (the in-process runner)": (None, None),
    "another desktop": (Fence(desktop_id="elsewhere", epoch=EPOCH), "placed on desktop local, not on elsewhere"),
    "an older session": (Fence(desktop_id=DESKTOP, epoch=EPOCH - 1), "another worker session"),
    "a newer session": (Fence(desktop_id=DESKTOP, epoch=EPOCH + 1), "another worker session"),
}


@pytest.mark.parametrize("report", sorted(REPORTS))
@pytest.mark.parametrize("fence", sorted(FENCES))
def test_a_report_is_accepted_only_under_the_lease_the_run_was_placed_with(report: str, fence: str):
    lease, says = FENCES[fence]
    command = msgspec.structs.replace(REPORTS[report], fence=lease)
    task = task_in("running")
    if says is None:
        decide(task, command)
        return
    with pytest.raises(RunOver) as lost:
        decide(task, command)
    assert lost.value.code == "lease_lost" and says in lost.value.detail


@pytest.mark.parametrize("report", sorted(REPORTS))
def test_a_report_on_a_superseded_or_cancelled_run_says_which(report: str):
    command = REPORTS[report]
    rerun = _fold(task_in("failed"), [t.TaskRetried(task_id=TASK), msgspec.structs.replace(STARTED, run_id="run-2")])
    cancelled = _fold(task_in("running"), [t.TaskCancelled(task_id=TASK, run_id=RUN)])
    for task, says in ((rerun, "superseded by run run-2"), (cancelled, "was cancelled"), (task_in("done"), "has ended")):
        with pytest.raises(RunOver) as lost:
            decide(task, command)
        assert says in lost.value.detail


def test_a_task_started_resets_the_run_s_lease_and_counts():
    asked = _fold(running_with_output(1, 2), [t.TaskInputRequested(task_id=TASK, run_id=RUN, prompt="?"),
                                             t.TaskMessage(task_id=TASK, run_id=RUN, message="yes")])
    assert asked is not None and (asked.output_seq, asked.asks, asked.messages) == (2, 1, 1)
    again = _fold(asked, [t.TaskFailed(task_id=TASK, run_id=RUN, reason="exit", error="1"), t.TaskRetried(task_id=TASK),
                          t.TaskStarted(task_id=TASK, run_id="run-2", agent_id="agent", desktop_id="d2", lease_epoch=7)])
    assert again is not None
    assert (again.run_desktop_id, again.lease_epoch, again.output_seq, again.asks, again.messages) == ("d2", 7, 0, 0, 0)


def test_the_lease_and_counts_are_not_served():
    task = running_with_output(1)
    served_fields = set(msgspec.json.decode(msgspec.json.encode(served(task))))
    assert served_fields == {f.encode_name for f in msgspec.structs.fields(Task)}
    assert not served_fields & {"runDesktopId", "leaseEpoch", "placedPosition", "outputSeq", "asks", "messages"}
    assert served(task).id == task.id and served(task).version == task.version


def test_resent_output_is_recorded_once_and_the_rest_continues():
    task = running_with_output(1, 2)
    events = decide(task, RecordOutput(run_id=RUN, chunks=_output(1, 2, 3, 3, 4), fence=LEASE))
    assert [e.seq for e in events] == [3, 4]
    assert decide(task, RecordOutput(run_id=RUN, chunks=_output(1, 2), fence=LEASE)) == []
    assert _fold(task, events).output_seq == 4


@pytest.mark.parametrize("seqs", [(4,), (3, 5), (2, 4), (5, 3)])
def test_output_past_a_hole_is_refused_whole_with_where_to_resend_from(seqs):
    with pytest.raises(OutputGap) as gap:
        decide(running_with_output(1, 2), RecordOutput(run_id=RUN, chunks=_output(*seqs), fence=LEASE))
    assert (gap.value.code, gap.value.expected_seq) == ("output_gap", 3)
    assert "send from seq 3" in gap.value.detail


def test_a_question_is_recorded_once_and_never_overtakes_its_output():
    task = running_with_output(1, 2)
    with pytest.raises(OutputGap) as gap:
        decide(task, RequestInput(run_id=RUN, prompt="?", number=1, after_seq=3, fence=LEASE))
    assert gap.value.expected_seq == 3
    asked = _fold(task, decide(task, RequestInput(run_id=RUN, prompt="?", number=1, after_seq=2, fence=LEASE)))
    assert asked is not None and asked.status == "awaiting_input"
    assert decide(asked, RequestInput(run_id=RUN, prompt="?", number=1, after_seq=2, fence=LEASE)) == []
    answered = _fold(asked, decide(asked, SendMessage(message="yes")))
    assert answered is not None and answered.status == "running"
    assert decide(answered, RequestInput(run_id=RUN, prompt="?", number=1, fence=LEASE)) == []  # late resend
    second = decide(answered, RequestInput(run_id=RUN, prompt="and?", number=2, fence=LEASE))
    assert [e.event_type for e in second] == ["task.input_requested"]


@pytest.mark.parametrize("ending", [
    FinishRun(run_id=RUN, approval_id="a", result="r", fence=LEASE),
    FailRun(run_id=RUN, reason="exit", error="1", exit_code=1, fence=LEASE),
])
def test_an_ending_carries_its_output_deduped_and_is_refused_with_output_missing(ending):
    task = running_with_output(1, 2)
    done = decide(task, msgspec.structs.replace(ending, output=_output(2, 3), last_seq=3))
    assert [getattr(e, "seq", None) for e in done[:-1]] == [3] and done[-1].event_type in ("task.completed", "task.failed")
    assert _fold(task, done).status in ("done", "failed")
    for output, last_seq in (((3,), 4), ((), 3), ((4,), 4), ((), 1)):
        with pytest.raises(OutputGap) as gap:
            decide(task, msgspec.structs.replace(ending, output=_output(*output), last_seq=last_seq))
        assert gap.value.expected_seq == 3 + (output == (3,))
    assert decide(task, msgspec.structs.replace(ending, output=_output(1, 2)))[-1].event_type == done[-1].event_type


def test_losing_a_run_is_decided_once_and_only_under_its_epoch():
    lose = COMMANDS["lose"]
    lost = decide(task_in("awaiting_input"), lose)
    assert lost == [t.TaskFailed(task_id=TASK, run_id=RUN, reason="lost", error=lose.error)]  # type: ignore[attr-defined]
    assert decide(_fold(task_in("running"), lost), lose) == []  # the second keeper finds it ended
    assert decide(task_in("running"), msgspec.structs.replace(lose, epoch=EPOCH + 1)) == []
    assert decide(task_in("running"), msgspec.structs.replace(lose, run_id="run-0")) == []


USED = t.RunUsage(prompt_tokens=1200, completion_tokens=30, cost_usd="0.000198")


def test_a_task_s_runs_each_with_its_desktop_and_how_it_ended():
    created = t.TaskCreated(task_id=TASK, type="prompt", content="x", project_id="p", created_by="alice")
    history = [
        created, STARTED, t.TaskInputRequested(task_id=TASK, run_id=RUN, prompt="?"),
        t.TaskFailed(task_id=TASK, run_id=RUN, reason="exit", error="exit 2", exit_code=2),
        t.TaskRetried(task_id=TASK),
        t.TaskStarted(task_id=TASK, run_id="run-2", agent_id="agent-2", desktop_id="laptop", lease_epoch=1),
        t.TaskOutput(task_id=TASK, run_id=RUN, seq=9, stream="text", chunk="a late report changes nothing"),
        t.ArtifactRecorded(task_id=TASK, run_id="run-2", name="r.txt", sha256="a" * 64, size=1,
                           content_type="text/plain", direction="output"),  # in the append of its ending
        t.TaskReview(task_id=TASK, run_id="run-2", result="r", usage=USED),
        t.ApprovalCreated(approval_id=APPROVAL, task_id=TASK, run_id="run-2"),
        t.ApprovalResolved(approval_id=APPROVAL, task_id=TASK, decision="approve"),
        t.TaskCompleted(task_id=TASK, run_id="run-2", result="r"),
        t.TaskRetried(task_id=TASK),  # (as if) run again, then cancelled while running
        t.TaskStarted(task_id=TASK, run_id="run-3", agent_id="agent", desktop_id=DESKTOP, lease_epoch=EPOCH),
        t.TaskCancelled(task_id=TASK, run_id="run-3", reason="enough"),
    ]
    found = runs([_event(data, n) for n, data in enumerate(history, 1)])
    at = [f"2026-01-01T00:00:{n:02}Z" for n in range(len(history) + 1)]
    assert [msgspec.structs.asdict(r) for r in found] == [
        dict(run_id=RUN, number=1, agent_id="agent", desktop_id=DESKTOP, status="failed", queued_at=None,
             started_at=at[2], ended_at=at[4], exit_code=2, reason="exit", error="exit 2", usage=None,
             artifacts=[]),
        dict(run_id="run-2", number=2, agent_id="agent-2", desktop_id="laptop", status="done", queued_at=None,
             started_at=at[6], ended_at=at[9], exit_code=None, reason=None, error=None, usage=USED,
             artifacts=["a" * 64]),
        dict(run_id="run-3", number=3, agent_id="agent", desktop_id=DESKTOP, status="cancelled", queued_at=None,
             started_at=at[14], ended_at=at[15], exit_code=None, reason=None, error="cancelled: enough", usage=None,
             artifacts=[]),
    ]
    # The task's usage counts each run once: the review's usage, not again at its approval; the
    # failed and the cancelled run ran without reporting any, so their cost is not known.
    folded = None
    for n, data in enumerate(history, 1):
        folded = evolve(folded, _event(data, n))
    assert folded.usage == Usage(prompt_tokens=1200, completion_tokens=30, cost_usd="0.000198", unpriced_runs=2)
    assert "task.output" not in OUTPUT_FREE and "task.started" in OUTPUT_FREE


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
    assert conflict("/tasks/{task_id}/cancel").startswith("The task's status is not pending, queued, running or awaiting_input,")
    assert conflict("/tasks/{task_id}/retry").startswith("The task's status is not failed or cancelled,")
    assert conflict("/tasks/{task_id}/messages").startswith("The task's status is not running or awaiting_input,")
    assert conflict("/approvals/{approval_id}/resolve").startswith("The task's status is not review,")
