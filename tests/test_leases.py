"""The lease keeper on a real log, with an injected clock: when a lapse is recorded, that it is
recorded once however many keepers see it, that a silent desktop goes offline, and that a revoked
worker key ends its desktop's runs at once."""

from __future__ import annotations

import asyncio
import uuid

from events import Meta, TypeFilter, decode, streams
from events import types as t
from projections.readmodels import read_models
from service.commands.desktops import Register
from service.commands.handling import Commands
from service.work.leases import Keeper, MemoryLeases

LEASE = 4.0
TICK = LEASE / 4
"""How often a keeper wakes."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _setup(log_factory):
    log = await log_factory()
    models = read_models(log)
    await models.prepare()
    return log, models, Commands(log, models)


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


async def test_a_lapse_is_recorded_between_one_and_a_quarter_leases_after_the_last_renewal(log_factory):
    log, models, commands = await _setup(log_factory)
    await _register(commands, "d1")
    clock, leases = Clock(), MemoryLeases()
    keeper = Keeper(log, models, commands, leases, LEASE, None, clock)
    await keeper.prepare()
    task_id, run_id, started = await _placed(log, "d1")
    await keeper.seen(started)  # what the keeper's tail does with it: the first lease
    renewed = clock.now + 2.5 * TICK  # between two of the keeper's wakes
    lapsed_at = None
    while clock.now < renewed + 3 * LEASE and lapsed_at is None:
        tick = clock.now + TICK
        if clock.now < renewed <= tick:
            clock.now = renewed
            leases.renew(run_id, clock.now + LEASE)  # a report, as the worker service renews it
        clock.now = tick
        leases.heard("d1", clock.now)  # its worker still polls: only the run lapses
        await keeper.sweep()
        if await _failures(log, task_id):
            lapsed_at = clock.now
    assert lapsed_at is not None, "the lease never lapsed"
    assert LEASE < lapsed_at - renewed <= 1.25 * LEASE, (lapsed_at - renewed) / LEASE
    [failed] = await _failures(log, task_id)
    assert failed.reason == "lost" and failed.run_id == run_id
    assert failed.error.startswith("Desktop d1 stopped reporting on this run; its lease lapsed at ")
    [event] = (await log.read_stream(streams.task(task_id)))[-1:]
    assert event.type == "task.failed"
    assert decode(started).run_id == run_id and b'"causationId":"%d"' % started.position in bytes(event.meta)


async def test_two_keepers_that_see_one_lapse_record_it_once(log_factory):
    log, models, commands = await _setup(log_factory)
    await _register(commands, "d1")
    task_id, run_id, _ = await _placed(log, "d1")
    clock = Clock()
    # Two nodes: each its own leases and its own commands; both take the run up at their start.
    keepers = [Keeper(log, models, Commands(log, models), MemoryLeases(), LEASE, None, clock) for _ in range(2)]
    for keeper in keepers:
        await keeper.prepare()
    for _ in range(4):  # up to the deadline: nothing
        clock.now += TICK
        for keeper in keepers:
            keeper.leases.heard("d1", clock.now)
        await asyncio.gather(*(keeper.sweep() for keeper in keepers))
    assert await _failures(log, task_id) == []
    clock.now += TICK
    for keeper in keepers:
        keeper.leases.heard("d1", clock.now)
    await asyncio.gather(*(keeper.sweep() for keeper in keepers))
    assert [f.run_id for f in await _failures(log, task_id)] == [run_id]
    await asyncio.gather(*(keeper.sweep() for keeper in keepers))  # and never again
    assert len(await _failures(log, task_id)) == 1


async def test_a_desktop_silent_past_a_lease_goes_offline_and_its_runs_are_lost(log_factory):
    log, models, commands = await _setup(log_factory)
    await _register(commands, "quiet")
    await _register(commands, "chatty")
    task_id, run_id, _ = await _placed(log, "quiet")
    clock, leases = Clock(), MemoryLeases()
    keeper = Keeper(log, models, commands, leases, LEASE, None, clock)
    await keeper.prepare()  # a restart: every desktop not offline has a lease from now to be heard from
    assert leases.last_heard("quiet") is None  # a restart is no time it was heard from (lastSeenAt stays its own)
    leases.renew(run_id, clock.now + 10 * LEASE)  # the run's own lease would hold: the silence ends it
    for _ in range(5):
        clock.now += TICK
        leases.heard("chatty", clock.now)
        await keeper.sweep()
    quiet, chatty = await models.desktop("quiet"), await models.desktop("chatty")
    assert (quiet.status, chatty.status) == ("offline", "online")
    assert await _offline_reasons(log, "quiet") == ["silent"]
    assert [(f.run_id, f.reason) for f in await _failures(log, task_id)] == [(run_id, "lost")]
    await keeper.sweep()
    assert len(await log.read_stream(streams.desktop("quiet"))) == 2  # registered, offline: once


async def test_a_revoked_worker_key_ends_its_desktops_runs_at_once(log_factory):
    log, models, commands = await _setup(log_factory)
    await _register(commands, "w1", key_id="k1")
    task_id, run_id, _ = await _placed(log, "w1")
    keeper = Keeper(log, models, commands, MemoryLeases(), LEASE, None, Clock())  # its clock never moves
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
