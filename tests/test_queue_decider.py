"""The queue's decisions, pure: `StartRun` with `queue` and the dispatcher's `DispatchRun`, on
states folded by the same `evolve` the read models use."""

from __future__ import annotations

import msgspec
import pytest

from events import types as t
from service.commands.deciders import DispatchRun, Refused, decide
from tests.test_lifecycle import ECHO, LOCAL, TASK, _fold, start, task_in

QUEUED_AT = "2026-01-01T00:00:02Z"  # the `task.queued` of task_in("queued") is version 2


def queued(**created):
    task = _fold(task_in("pending", **created), [t.TaskQueued(task_id=TASK, run_id="run-1", agent_id=ECHO.id,
                                                             queue_timeout_seconds=60)])
    assert task.queued_at == QUEUED_AT and task.queue_deadline == "2026-01-01T00:01:02.000000Z"
    return task


def dispatch(running: int = 0, dependencies: dict | None = None, now: str = "2026-01-01T00:00:30Z", **changes):
    command = DispatchRun(agent=ECHO, running=running, limit=5, dependencies=dependencies or {}, desktops=[LOCAL],
                          now=now)
    return msgspec.structs.replace(command, **changes)


@pytest.mark.parametrize(("created", "asked"), [
    ({}, {"running": 5}),  # the limit
    ({"desktop_id": "elsewhere"}, {}),  # a desktop not online
    ({}, {"desktops": [msgspec.structs.replace(LOCAL, busy=5)]}),  # a desktop full
    ({}, {"dependencies": {"dep": "running"}}),  # a dependency not done yet
], ids=["limit", "desktop-offline", "desktop-full", "dependency"])
def test_with_queue_what_waiting_cures_is_queued_instead_of_refused(created, asked):
    pending = task_in("pending", priority=7, **created)
    command = msgspec.structs.replace(start(), **asked)
    with pytest.raises(Refused):
        decide(pending, command)
    events = decide(pending, msgspec.structs.replace(command, queue=True, queue_timeout_seconds=30))
    assert events == [t.TaskQueued(task_id=TASK, run_id="run-2", agent_id=ECHO.id, priority=7, queue_timeout_seconds=30)]
    assert _fold(pending, events).status == "queued"


@pytest.mark.parametrize("dependency", [None, "failed", "cancelled"], ids=["missing", "failed", "cancelled"])
def test_a_dependency_that_will_never_be_done_is_refused_even_with_queue(dependency):
    command = msgspec.structs.replace(start(), dependencies={"dep": dependency}, queue=True)
    with pytest.raises(Refused) as refused:
        decide(task_in("pending"), command)
    assert refused.value.code == "dependency_not_done"


def test_a_queued_run_starts_under_its_own_run_id_and_counts_once():
    task = queued()
    events = decide(task, dispatch())
    assert events == [t.TaskStarted(task_id=TASK, run_id="run-1", agent_id=ECHO.id, desktop_id="local", lease_epoch=3)]
    running = _fold(task, events)
    assert (running.status, running.runs, running.run_id, running.queue_deadline) == ("running", 1, "run-1", None)


@pytest.mark.parametrize("stays", [
    {"running": 5}, {"dependencies": {"dep": "running"}}, {"agent": msgspec.structs.replace(ECHO, status="paused")},
    {"desktops": [msgspec.structs.replace(LOCAL, busy=5)]},
], ids=["limit", "dependency", "agent-paused", "desktop-full"])
def test_a_queued_run_that_cannot_start_stays_queued_with_nothing_recorded(stays):
    assert decide(queued(), dispatch(**stays)) == []


def test_a_queued_run_past_its_deadline_fails_queue_timeout_even_when_it_could_start():
    events = decide(queued(), dispatch(now="2026-01-01T00:01:02Z"))
    assert [(e.event_type, e.reason, e.run_id) for e in events] == [("task.failed", "queue_timeout", "run-1")]
    assert "60 s" in events[0].error


@pytest.mark.parametrize("dependency", ["failed", "cancelled", None], ids=["failed", "cancelled", "missing"])
def test_a_queued_run_whose_dependency_failed_fails_dependency_failed(dependency):
    events = decide(queued(), dispatch(dependencies={"dep": dependency}))
    assert [(e.event_type, e.reason) for e in events] == [("task.failed", "dependency_failed")]
    assert "dep" in events[0].error
