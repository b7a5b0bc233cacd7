"""Carrying out commands on a real log, without a server."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from events import Meta
from events import types as t
from projections.readmodels import read_models
from service.commands.handling import Commands
from service.commands.deciders import CreateTask, Refused
from service.commands.desktops import Drain, MarkOffline, Register, Remove


def _created(task_id: str, content: str) -> CreateTask:
    return CreateTask(event=t.TaskCreated(
        task_id=task_id, type="prompt", content=content, project_id=str(uuid.uuid4()), created_by="tester",
    ))


async def test_creating_under_a_taken_id_is_refused_and_changes_nothing(log_factory):
    log = await log_factory()
    models = read_models(log)
    await models.prepare()
    commands = Commands(log, models)
    task_id = str(uuid.uuid4())
    created, recorded = await commands.task(task_id, _created(task_id, "first"), Meta(actor="tester"))
    assert (created.content, created.version, len(recorded)) == ("first", 1, 1)
    head = await log.read_head()

    with pytest.raises(Refused) as refused:
        await commands.task(task_id, _created(task_id, "second"), Meta(actor="tester"))

    assert refused.value.code == "already_exists"
    assert await log.read_head() == head
    assert [e.type for e in await log.read_stream(f"task-{task_id}")] == ["task.created"]


def _register(session: str, node: bool = False) -> Register:
    return Register(session_id=session, agents=["echo"], capacity=2, node=node)


async def test_desktop_commands_append_at_the_stream_s_version_and_race_to_one_decision(log_factory):
    log = await log_factory()
    models = read_models(log)
    await models.prepare()
    commands = Commands(log, models)
    meta = Meta(actor="tester")

    # Ten resends of one session's registration at once: one new session, one epoch.
    answers = await asyncio.gather(*(commands.desktop("laptop", _register("s1"), meta) for _ in range(10)))
    assert sum(len(recorded) for _, recorded in answers) == 1
    assert {(d.status, d.epoch) for d, _ in answers} == {("online", 1)}
    assert (await models.desktop("laptop")).session_id == "s1"

    # Two drains racing (an admin's and the worker's own): decided one after the other on what each finds.
    await asyncio.gather(commands.desktop("laptop", Drain(by="admin"), meta), commands.desktop("laptop", Drain(by="worker"), meta))
    assert (await models.desktop("laptop")).drained_by == "admin"

    # Removed, then registered again: its stream goes on from the removal.
    await commands.desktop("laptop", MarkOffline(reason="left"), meta)
    gone, recorded = await commands.desktop("laptop", Remove(), meta)
    assert gone is None and [e.type for e in recorded] == ["desktop.removed"]
    back, recorded = await commands.desktop("laptop", _register("s2"), meta)
    assert (back.status, back.drained_by, back.epoch, back.stream_version) == ("online", None, 1, recorded[0].version)
    assert [e.type for e in await log.read_stream("desktop-laptop")][-2:] == ["desktop.removed", "desktop.registered"]

    with pytest.raises(Refused) as refused:
        await commands.desktop("laptop", Remove(), meta)
    assert refused.value.code == "invalid_status" and "online" in refused.value.detail
