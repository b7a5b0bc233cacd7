"""Placement as a pure decision: which desktop `POST /tasks/{id}/run` puts a run on, and when it
refuses (design: docs/design/desktops.md, section 2 "Placement"). No log, no server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from events import Event
from events import types as t
from projections.agents import Agent
from projections.desktops import Placement
from projections.tasks import TaskState, evolve
from service.commands.deciders import Refused, StartRun, decide
from service.http.errors import refusal_response

ECHO = Agent(id="echo", name="echo", kind="echo", created_at="")
OPENAI = Agent(id="openai", name="gpt", kind="openai", created_at="")


def desktop(name: str, busy: int = 0, capacity: int = 1, status: str = "online",
            agents: tuple[str, ...] = ("echo", "openai"), epoch: int = 1) -> Placement:
    return Placement(id=name, status=status, agents=list(agents), capacity=capacity, busy=busy, epoch=epoch)


def pending(task_id: str = "t", desktop_id: str | None = None) -> TaskState:
    created = t.TaskCreated(task_id=task_id, type="prompt", content="x", project_id="p", created_by="u",
                            desktop_id=desktop_id)
    task = evolve(None, Event(created, 1, f"task-{task_id}", 1, "2026-01-01T00:00:00Z", "u"))
    assert task is not None
    return task


def start(desktops: list[Placement], agent: Agent = ECHO, running: int = 0, limit: int = 100) -> StartRun:
    return StartRun(run_id="r", agent=agent, agent_id=agent.id, actor="u", actor_is_admin=False,
                    running=running, limit=limit, dependencies={}, desktops=desktops)


def placed(task: TaskState, command: StartRun) -> tuple[str | None, int]:
    [started] = decide(task, command)
    assert isinstance(started, t.TaskStarted)
    return started.desktop_id, started.lease_epoch


def refusal(task: TaskState, command: StartRun) -> Refused:
    with pytest.raises(Refused) as refused:
        decide(task, command)
    return refused.value


def test_a_named_desktop_takes_the_run_under_its_epoch():
    assert placed(pending(desktop_id="b"), start([desktop("a"), desktop("b", epoch=4)])) == ("b", 4)


@pytest.mark.parametrize(("named", "fleet", "says"), [
    ("nowhere", [desktop("a")], "Desktop nowhere is not registered"),
    ("a", [desktop("a", status="offline")], "Desktop a is offline"),
    ("a", [desktop("a", status="draining")], "Desktop a is draining"),
    ("a", [desktop("a", agents=("echo",))], "Desktop a does not host openai agents; it hosts echo."),
])
def test_a_named_desktop_that_cannot_take_the_run_is_503_saying_why(named, fleet, says):
    refused = refusal(pending(desktop_id=named), start(fleet, OPENAI))
    assert (refused.code, refused.detail[: len(says)]) == ("desktop_unavailable", says)
    assert refusal_response(refused).status_code == 503


def test_a_full_named_desktop_is_429_with_retry_after_even_when_others_are_free():
    refused = refusal(pending(desktop_id="a"), start([desktop("a", busy=2, capacity=2), desktop("b")]))
    assert refused.code == "desktop_full" and "running 2 of its 2 runs" in refused.detail
    response = refusal_response(refused)
    assert (response.status_code, response.headers["Retry-After"]) == (429, "5")


def test_without_a_name_the_run_goes_where_most_slots_are_free_then_by_name():
    fleet = [desktop("c", busy=1, capacity=4), desktop("b", busy=0, capacity=3), desktop("a", busy=1, capacity=4)]
    assert placed(pending(), start(fleet)) == ("a", 1)  # each has 3 free: by name, a
    fleet = [desktop("c", busy=0, capacity=4), desktop("b", busy=0, capacity=3), desktop("a", busy=2, capacity=4)]
    assert placed(pending(), start(fleet)) == ("c", 1)


def test_without_a_name_only_online_desktops_hosting_the_kind_count():
    fleet = [desktop("a", status="draining", capacity=9), desktop("b", status="offline", capacity=9),
             desktop("c", agents=("echo",), capacity=9), desktop("d", busy=1, capacity=2)]
    assert placed(pending(), start(fleet, OPENAI)) == ("d", 1)


def test_without_a_name_none_hosting_the_kind_is_503_and_all_full_is_429():
    refused = refusal(pending(), start([desktop("a", agents=("echo",)), desktop("b", status="draining")], OPENAI))
    assert (refused.code, refused.detail) == ("desktop_unavailable", "No online desktop hosts openai agents.")
    assert refusal(pending(), start([])).code == "desktop_unavailable"
    refused = refusal(pending(), start([desktop("b", busy=1), desktop("a", busy=3, capacity=2)]))
    assert (refused.code, refused.retry_after) == ("desktop_full", 5)
    assert "at its capacity (a, b)" in refused.detail


def test_the_global_limit_is_judged_before_any_desktop():
    assert refusal(pending(desktop_id="nowhere"), start([], running=3, limit=3)).code == "concurrency_limit"


# --- the property: no sequence of starts and endings exceeds the limit or a capacity -----------

FLEET = {"a": (1, ("echo", "openai")), "b": (2, ("echo",)), "c": (3, ("openai",))}
"""name: (capacity, kinds hosted)."""
LIMIT = 4

STEPS = st.lists(st.one_of(
    st.tuples(st.just("start"), st.sampled_from([None, *FLEET, "gone"]), st.sampled_from([ECHO, OPENAI])),
    st.tuples(st.just("end"), st.integers(0, 10), st.none()),
    st.tuples(st.just("drain"), st.sampled_from(sorted(FLEET)), st.booleans()),
), max_size=60)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(steps=STEPS)
def test_no_sequence_of_starts_and_endings_exceeds_the_limit_or_a_capacity(steps):
    runs: list[str] = []  # the desktop of each run in progress
    status = {name: "online" for name in FLEET}
    for number, (step, which, detail) in enumerate(steps):
        if step == "end":
            if runs:
                runs.pop(which % len(runs))
            continue
        if step == "drain":
            status[which] = "draining" if detail else "online"
            continue
        fleet = [desktop(name, busy=runs.count(name), capacity=capacity, status=status[name], agents=kinds)
                 for name, (capacity, kinds) in FLEET.items()]
        try:
            [started] = decide(pending(f"t{number}", which), start(fleet, detail, running=len(runs), limit=LIMIT))
        except Refused as refused:  # refused only when it must be
            takers = [d for d in fleet if d.status == "online" and detail.kind in d.agents
                      and (which is None or d.id == which)]
            if refused.code == "concurrency_limit":
                assert len(runs) == LIMIT
            elif refused.code == "desktop_full":
                assert takers and all(d.busy >= d.capacity for d in takers)
            else:
                assert refused.code == "desktop_unavailable" and not takers
            continue
        assert isinstance(started, t.TaskStarted) and started.desktop_id is not None
        assert which in (None, started.desktop_id)
        assert detail.kind in FLEET[started.desktop_id][1] and status[started.desktop_id] == "online"
        runs.append(started.desktop_id)
        assert len(runs) <= LIMIT
        assert all(runs.count(name) <= capacity for name, (capacity, _) in FLEET.items())
