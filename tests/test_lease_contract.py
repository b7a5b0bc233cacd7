"""What every backend's lease store must do, through the LeaseStore interface alone: the
database's clock decides what has lapsed, a lease is never shortened nor a lapsed one revived, and
two stores on one database (two nodes) see each other's grants, renewals and hearings."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from service.work.leases import LeaseStore, open_leases

HOLDS = 3600.0
"""A lease this long does not lapse while a test runs."""
LAPSED = -1.0
"""A lease granted for this long has lapsed already."""


@pytest.fixture
async def opened():
    """Opens a log's lease store, prepared; closes every one it opened at teardown."""
    stores: list[LeaseStore] = []

    async def open_(log, prepare: bool = True) -> LeaseStore:
        stores.append(open_leases(log))
        if prepare:
            await stores[-1].prepare()
        return stores[-1]

    yield open_
    for store in stores:
        await store.close()


async def _two(log_factory, opened) -> tuple[LeaseStore, LeaseStore]:
    """Two nodes' stores: each on a log of its own, both on one database."""
    first = await log_factory()
    second = await log_factory.reopen(first)
    return await opened(first), await opened(second)


async def _lapsed(leases: LeaseStore, *run_ids: str) -> list[str]:
    return sorted(lapse.run_id for lapse in await leases.lapsed(list(run_ids) if run_ids else None))


async def test_a_lease_lapses_once_its_deadline_has_passed_and_says_when(log_factory, opened):
    leases = await opened(await log_factory())
    assert await leases.lapsed() == []
    await leases.grant("r1", "t1", HOLDS)
    await leases.grant("r2", "t2", LAPSED)
    [lapse] = await leases.lapsed()
    assert (lapse.run_id, lapse.task_id) == ("r2", "t2")
    assert lapse.deadline.utcoffset() == datetime.timedelta(0)
    assert lapse.deadline < datetime.datetime.now(datetime.UTC)


async def test_lapsed_asked_for_some_runs_answers_of_those_alone(log_factory, opened):
    leases = await opened(await log_factory())
    for run_id in ("r1", "r2", "r3"):
        await leases.grant(run_id, "t", LAPSED)
    await leases.grant("r4", "t", HOLDS)
    assert await _lapsed(leases, "r1", "r3", "r4", "unknown") == ["r1", "r3"]
    assert await leases.lapsed([]) == []
    assert await _lapsed(leases) == ["r1", "r2", "r3"]


async def test_a_lease_is_never_shortened(log_factory, opened):
    leases = await opened(await log_factory())
    await leases.grant("r1", "t1", HOLDS)
    await leases.grant("r1", "t1", LAPSED)  # a late grant (another node's tail) keeps the later deadline
    await leases.renew("d1", ["r1"], LAPSED)
    assert await leases.lapsed() == []


async def test_a_renewal_revives_no_lapsed_lease_and_creates_none(log_factory, opened):
    leases = await opened(await log_factory())
    await leases.grant("r1", "t1", LAPSED)
    await leases.renew("d1", ["r1", "ended"], HOLDS)
    assert await _lapsed(leases) == ["r1"]  # to be recorded lost, not renewed
    await leases.grant("ended", "t2", LAPSED)  # had the renewal made a lease, this one would hold
    assert await _lapsed(leases) == ["ended", "r1"]


async def test_a_renewal_is_its_desktop_heard_from_even_holding_no_run(log_factory, opened):
    leases = await opened(await log_factory())
    await leases.renew("d1", [], HOLDS)
    heard = await leases.last_heard("d1")
    assert heard is not None
    await leases.grant("r1", "t1", HOLDS)
    await leases.renew("d1", ["r1"], HOLDS)
    assert await leases.last_heard("d1") >= heard and set(await leases.silences()) == {"d1"}


async def test_a_dropped_lease_is_gone(log_factory, opened):
    leases = await opened(await log_factory())
    await leases.grant("r1", "t1", LAPSED)
    await leases.drop("r1")
    await leases.drop("r1")  # every node's tail drops it: again is nothing
    assert await leases.lapsed() == []


async def test_a_desktop_heard_from_is_last_heard_then_and_silent_since(log_factory, opened):
    leases = await opened(await log_factory())
    assert await leases.last_heard("d1") is None
    assert await leases.silences() == {}
    await leases.heard("d1")
    first = await leases.last_heard("d1")
    assert first is not None and first.utcoffset() == datetime.timedelta(0)
    silence = (await leases.silences())["d1"]
    assert silence >= 0
    await leases.heard("d1")
    assert await leases.last_heard("d1") >= first
    assert set(await leases.silences()) == {"d1"}


async def test_two_stores_on_one_database_see_each_others_leases_and_hearings(log_factory, opened):
    a, b = await _two(log_factory, opened)
    await a.grant("r1", "t1", LAPSED)
    await a.grant("r2", "t2", HOLDS)
    assert await _lapsed(b) == ["r1"]  # a lapse either node can record
    await b.renew("d1", ["r1"], HOLDS)
    assert await _lapsed(a) == ["r1"]  # renewed through the other node: still not revived
    await b.grant("r2", "t2", LAPSED)
    await a.renew("d1", ["r2"], LAPSED)
    assert await _lapsed(b) == ["r1"]  # held by the first node's grant
    await b.drop("r1")
    assert await a.lapsed() == []

    await b.heard("d2")
    assert await a.last_heard("d2") == await b.last_heard("d2")
    assert set(await a.silences()) == {"d1", "d2"}


async def test_stores_prepared_at_once_on_one_database_share_one_table(log_factory, opened):
    first = await log_factory()
    logs = [first, *[await log_factory.reopen(first) for _ in range(2)]]
    stores = [await opened(log, prepare=False) for log in logs]
    await asyncio.gather(*(store.prepare() for store in stores))  # nodes starting together
    await stores[0].grant("r1", "t1", LAPSED)
    for store in stores:
        assert await _lapsed(store) == ["r1"]
    await stores[1].prepare()  # and again: what was there stays
    assert await _lapsed(stores[2]) == ["r1"]
