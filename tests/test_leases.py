"""The lease keeper on a real log and its shared lease store: a lapse is recorded once however many
nodes' keepers see it, a live lease never, a silent desktop goes offline (its silence counted on
the keeper's injected clock), and a revoked worker key ends its desktop's runs at once."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from events import Meta, TypeFilter, decode, streams
from events import types as t
from projections.readmodels import read_models
from service.commands.desktops import Register
from service.commands.handling import Commands
from service.work.leases import Keeper, LeaseStore, open_leases

LEASE = 30.0
"""Long enough that no lease granted for it lapses while a test runs: a lapse is made, by a lease
granted for LAPSED seconds (the worker's last renewal, long ago)."""
LAPSED = -1.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """What one `serve` process keeps leases with: its own log on the shared storage, its read
    models, commands, lease store and keeper."""

    def __init__(self, log, clock: Clock):
        self.log, self.models = log, read_models(log)
        self.commands = Commands(log, self.models)
        self.leases: LeaseStore = open_leases(log)
        self.keeper = Keeper(log, self.models, self.commands, self.leases, LEASE, clock)

    @classmethod
    async def on(cls, log, clock: Clock | None = None) -> Node:
        node = cls(log, clock or Clock())
        await node.models.prepare()
        await node.leases.prepare()
        return node


@pytest.fixture
async def make_nodes(log_factory):
    """`await make_nodes(n, clock)`: n nodes on one fresh log's storage; their stores closed at teardown."""
    made: list[Node] = []

    async def make(n: int, clock: Clock | None = None) -> list[Node]:
        first = await log_factory()
        logs = [first, *[await log_factory.reopen(first) for _ in range(n - 1)]]
        made.extend([await Node.on(log, clock) for log in logs])
        return made[-n:]

    yield make
    for node in made:
        await node.leases.close()


async def _register(commands: Commands, desktop_id: str, key_id: str | None = None) -> None:
    await commands.desktop(desktop_id, Register(
        session_id=str(uuid.uuid4()), agents=["echo"], capacity=2, key_id=key_id,
    ), Meta(actor="test"))


async def _placed(log, desktop_id: str) -> tuple[str, str, object]:
    """A task whose run was placed on the desktop (epoch 1); (task id, run id, its task.started)."""
    task_id, run_id = str(uuid.uuid4()), str(uuid.uuid4())
    recorded = await log.append(streams.task(task_id), [
        t.TaskCreated(task_id=task_id, type="prompt", content="hi", project_id=str(uuid.uuid4()), created_by="u"),
        t.TaskStarted(task_id=task_id, run_id=run_id, agent_id=str(uuid.uuid4()), desktop_id=desktop_id, lease_epoch=1),
    ], expected=0, meta=Meta(actor="test"))
    return task_id, run_id, recorded[-1]


async def _failures(log, task_id: str) -> list[t.TaskFailed]:
    return [decode(e) for e in await log.read_stream(streams.task(task_id), types=TypeFilter(["task.failed"]))]


async def _offline_reasons(log, desktop_id: str) -> list[str]:
    offline = await log.read_stream(streams.desktop(desktop_id), types=TypeFilter(["desktop.offline"]))
    return [decode(e).reason for e in offline]


async def test_a_lapsed_lease_is_recorded_lost_once_and_a_live_one_never(make_nodes):
    node, = await make_nodes(1)
    await _register(node.commands, "d1")
    await node.leases.heard("d1")  # its worker still polls: only the run lapses
    await node.keeper.prepare()
    live_task, _, live_started = await _placed(node.log, "d1")
    task_id, run_id, started = await _placed(node.log, "d1")
    for event in (live_started, started):
        await node.keeper.seen(event)  # what the keeper's tail does with it: the first lease
    await node.keeper.sweep()
    assert await _failures(node.log, task_id) == []

    await node.leases.drop(run_id)
    await node.leases.grant(run_id, task_id, LAPSED)
    await node.keeper.sweep()
    [failed] = await _failures(node.log, task_id)
    assert failed.reason == "lost" and failed.run_id == run_id
    assert failed.error.startswith("Desktop d1 stopped reporting on this run; its lease lapsed at ")
    [event] = (await node.log.read_stream(streams.task(task_id)))[-1:]
    assert event.type == "task.failed"
    assert decode(started).run_id == run_id and b'"causationId":"%d"' % started.position in bytes(event.meta)
    assert await node.leases.lapsed() == []  # dropped once recorded
    await node.keeper.sweep()
    assert len(await _failures(node.log, task_id)) == 1
    assert await _failures(node.log, live_task) == [] and (await node.models.desktop("d1")).status == "online"


async def test_two_nodes_keepers_that_see_one_lapse_at_once_record_it_once(make_nodes):
    clock = Clock()
    nodes = await make_nodes(2, clock)
    await _register(nodes[0].commands, "d1")
    task_id, run_id, _ = await _placed(nodes[0].log, "d1")
    for node in nodes:
        await node.keeper.prepare()  # both take the run up at their start
    await nodes[1].leases.drop(run_id)
    await nodes[1].leases.grant(run_id, task_id, LAPSED)  # and the desktop, never heard from, is silent
    clock.now += 2 * LEASE
    await asyncio.gather(*(node.keeper.sweep() for node in nodes))
    assert [f.run_id for f in await _failures(nodes[0].log, task_id)] == [run_id]
    assert await _offline_reasons(nodes[1].log, "d1") == ["silent"]
    await asyncio.gather(*(node.keeper.sweep() for node in nodes))  # and never again
    assert len(await _failures(nodes[1].log, task_id)) == 1
    assert len(await _offline_reasons(nodes[0].log, "d1")) == 1


async def test_a_renewal_through_one_node_keeps_the_run_from_the_other_nodes_keeper(make_nodes):
    a, b = await make_nodes(2)
    await _register(a.commands, "d1")
    task_id, run_id, started = await _placed(a.log, "d1")
    await a.keeper.seen(started)
    await b.leases.drop(run_id)
    await b.leases.grant(run_id, task_id, LEASE)  # the worker renews through b only
    await b.leases.heard("d1")
    await a.keeper.sweep()
    assert await _failures(a.log, task_id) == [] and (await a.models.desktop("d1")).status == "online"


async def test_a_desktop_silent_past_a_lease_goes_offline_and_its_runs_are_lost(make_nodes):
    clock = Clock()
    node, = await make_nodes(1, clock)
    await _register(node.commands, "quiet")
    await _register(node.commands, "chatty")
    task_id, run_id, _ = await _placed(node.log, "quiet")
    await node.keeper.prepare()  # a start: every desktop not offline has a lease from now to be heard from
    assert await node.leases.last_heard("quiet") is None  # a start is no time it was heard from
    assert await node.leases.lapsed() == []  # the run's own lease holds: the silence ends it
    for _ in range(5):
        clock.now += LEASE / 4
        await node.leases.heard("chatty")
        await node.keeper.sweep()
    quiet, chatty = await node.models.desktop("quiet"), await node.models.desktop("chatty")
    assert (quiet.status, chatty.status) == ("offline", "online")
    assert await _offline_reasons(node.log, "quiet") == ["silent"]
    assert [(f.run_id, f.reason) for f in await _failures(node.log, task_id)] == [(run_id, "lost")]
    await node.keeper.sweep()
    assert len(await node.log.read_stream(streams.desktop("quiet"))) == 2  # registered, offline: once


async def test_a_revoked_worker_key_ends_its_desktops_runs_at_once(make_nodes):
    node, = await make_nodes(1)  # its clock never moves
    log, models, keeper = node.log, node.models, node.keeper
    await _register(node.commands, "w1", key_id="k1")
    task_id, run_id, _ = await _placed(log, "w1")
    await keeper.start()
    try:
        await log.append(streams.apikey("k1"), [t.ApiKeyRevoked(key_id="k1")], meta=Meta(actor="test"))
        for _ in range(200):
            if (await models.desktop("w1")).status == "offline":
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the desktop of a revoked key stayed online")
    finally:
        await keeper.close()
    [failed] = await _failures(log, task_id)
    assert failed.reason == "lost" and "its worker key was revoked" in failed.error
    assert await _offline_reasons(log, "w1") == ["revoked"]
