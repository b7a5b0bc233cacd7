"""The desktop's decider and fold, pure: every (state, command) pair written out by hand from the
design (docs/design/desktops.md, sections 1 and 4), with no log and no server."""

from __future__ import annotations

import pytest

from events import Event
from events import types as t
from projections.desktops import Desktop, evolve
from service.commands.deciders import Command, Refused
from service.commands.desktops import Drain, MarkOffline, Register, Remove, Resume, decide_desktop

NAME = "laptop"


def registered(session: str = "s1", epoch: int = 1, node: bool = False) -> t.DesktopRegistered:
    return t.DesktopRegistered(desktop_id=NAME, session_id=session, epoch=epoch, agents=["echo"], capacity=2,
                               node=node)


HISTORIES: dict[str, list[t.EventData]] = {
    "unknown": [],
    "online": [registered()],
    "drained-by-worker": [registered(), t.DesktopDraining(desktop_id=NAME, by="worker")],
    "drained-by-admin": [registered(), t.DesktopDraining(desktop_id=NAME, by="admin")],
    "offline": [registered(), t.DesktopOffline(desktop_id=NAME, epoch=1, reason="silent")],
    "offline-drained": [registered(), t.DesktopDraining(desktop_id=NAME, by="admin"),
                        t.DesktopOffline(desktop_id=NAME, epoch=1, reason="silent")],
    "removed": [registered(), t.DesktopOffline(desktop_id=NAME, epoch=1, reason="left"), t.DesktopRemoved(desktop_id=NAME)],
}

COMMANDS: dict[str, Command] = {
    "same-session": Register(session_id="s1", agents=["echo"], capacity=2),
    "new-session": Register(session_id="s2", agents=["echo", "openai"], capacity=3),
    "as-a-node": Register(session_id="s2", agents=["echo"], capacity=5, node=True),
    "drain-admin": Drain(by="admin"),
    "drain-worker": Drain(by="worker"),
    "resume": Resume(),
    "offline": MarkOffline(reason="silent", epoch=1),
    "offline-stale": MarkOffline(reason="silent", epoch=0),
    "remove": Remove(),
}

# A cell: the event types recorded (without `desktop.`, joined by +), then after > the desktop's
# status and who drained it; `gone` once removed; `-` nothing recorded; 404/409 a refusal.
EXPECTED = """
               unknown        online                 drained-by-worker     drained-by-admin        offline        offline-drained              removed
same-session   registered>on  -                      -                     -                       online>on      online+draining>drain/admin  registered>on
new-session    registered>on  registered>on          registered>on         registered>drain/admin  registered>on  registered>drain/admin       registered>on
as-a-node      registered>on  409                    409                   409                     409            409                          registered>on
drain-admin    404            draining>drain/admin   draining>drain/admin  -                       409            409                          404
drain-worker   404            draining>drain/worker  -                     -                       409            409                          404
resume         404            -                      online>on             online>on               -              409                          404
offline        -              offline>off            offline>off/worker    offline>off/admin       -              -                            -
offline-stale  -              -                      -                     -                       -              -                            -
remove         404            409                    409                   409                     removed>gone   removed>gone                 404
"""


def _grid() -> dict[tuple[str, str], str]:
    header, *rows = [line.split() for line in EXPECTED.strip().splitlines()]
    return {(state, row[0]): cell for row in rows for state, cell in zip(header, row[1:], strict=True)}


GRID = _grid()
SHORT = {"online": "on", "offline": "off", "draining": "drain"}


def fold(desktop: Desktop | None, events: list[t.EventData], version: int = 0) -> Desktop | None:
    for data in events:
        version += 1
        desktop = evolve(desktop, Event(data, version, f"desktop-{NAME}", version, f"2026-01-01T00:00:{version:02}Z", "x"))
    return desktop


def desktop_in(state: str) -> tuple[Desktop | None, int]:
    history = HISTORIES[state]
    return fold(None, history), len(history)


def test_the_expectations_cover_every_state_and_command():
    assert {s for s, _ in GRID} == set(HISTORIES) and {c for _, c in GRID} == set(COMMANDS)


@pytest.mark.parametrize(("state", "command"), sorted(GRID))
def test_decide_and_evolve(state: str, command: str):
    expected = GRID[state, command]
    desktop, version = desktop_in(state)
    if expected in ("404", "409"):
        with pytest.raises(Refused) as refused:
            decide_desktop(NAME, desktop, COMMANDS[command])
        assert refused.value.code == {"404": "not_found", "409": "invalid_status"}[expected]
        assert NAME in refused.value.detail
        return
    events = decide_desktop(NAME, desktop, COMMANDS[command])
    names, _, leads_to = expected.partition(">")
    assert "+".join(e.event_type.removeprefix("desktop.") for e in events) == ("" if names == "-" else names)
    after = fold(desktop, events, version)
    if leads_to == "gone":
        assert after is None
        return
    if not leads_to:
        assert after == desktop
        return
    status, _, drained = leads_to.partition("/")
    assert after is not None and (SHORT[after.status], after.drained_by) == (status, drained or None)
    assert after.stream_version == version + len(events)


def test_a_new_session_moves_the_epoch_on_and_the_same_session_keeps_it():
    online, _ = desktop_in("online")
    [again] = decide_desktop(NAME, online, COMMANDS["new-session"])
    assert isinstance(again, t.DesktopRegistered) and (again.epoch, again.capacity, again.agents) == (2, 3, ["echo", "openai"])
    offline, _ = desktop_in("offline")
    [back] = decide_desktop(NAME, offline, COMMANDS["same-session"])
    assert back == t.DesktopOnline(desktop_id=NAME, epoch=1)
    [first] = decide_desktop(NAME, None, COMMANDS["new-session"])
    assert isinstance(first, t.DesktopRegistered) and first.epoch == 1


def test_a_node_s_own_desktop_is_refused_to_a_worker_and_a_new_session_to_its_node():
    node = fold(None, [registered(node=True)])
    with pytest.raises(Refused) as refused:
        decide_desktop(NAME, node, COMMANDS["new-session"])
    assert (refused.value.code, refused.value.detail) == (
        "invalid_status", "Desktop laptop is a node's own desktop; a worker cannot register as it.")
    [restarted] = decide_desktop(NAME, node, COMMANDS["as-a-node"])
    assert isinstance(restarted, t.DesktopRegistered) and (restarted.epoch, restarted.node) == (2, True)


def test_the_fold_keeps_what_the_registration_said_and_when():
    desktop = fold(None, [registered(), t.DesktopOffline(desktop_id=NAME, epoch=1, reason="silent")])
    assert desktop is not None
    assert (desktop.id, desktop.status, desktop.epoch, desktop.session_id, desktop.agents, desktop.capacity) == (
        NAME, "offline", 1, "s1", ["echo"], 2)
    assert (desktop.registered_at, desktop.changed_at) == ("2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z")
