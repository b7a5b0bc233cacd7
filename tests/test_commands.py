"""Carrying out commands on a real log, without a server."""

from __future__ import annotations

import uuid

import pytest

from events import Meta
from events import types as t
from projections.readmodels import read_models
from service.commands.handling import Commands
from service.commands.deciders import CreateTask, Refused


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
