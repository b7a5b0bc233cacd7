"""Reads gathered into one query (projections/gathering.py): what a GET of a task on PostgreSQL
relies on, with a fetch standing in for the database that records what it is asked."""

from __future__ import annotations

import asyncio

import pytest

from projections.gathering import GatheredReads


class Database:
    """Rows by key; each fetch answers the rows as they stood when it was sent (a snapshot, as a
    query sees), and is held until `release`d."""

    def __init__(self, rows: dict[str, str]):
        self.rows = rows
        self.asked: list[list[str]] = []
        self.gate = asyncio.Event()
        self.failure: Exception | None = None

    async def fetch(self, keys: list[str]) -> dict[str, str]:
        self.asked.append(sorted(keys))
        snapshot = dict(self.rows)
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return {key: snapshot[key] for key in keys if key in snapshot}

    def release(self) -> None:
        self.gate.set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_reads_asked_while_every_slot_is_busy_go_together_and_each_gets_its_own_row():
    db = Database({"a": "A", "b": "B", "c": "C"})
    reads = GatheredReads(db.fetch, slots=1)
    first = asyncio.ensure_future(reads.get("a"))
    await settle()  # the first read is out, alone
    later = [asyncio.ensure_future(reads.get(key)) for key in ("b", "c", "b", "missing")]
    await settle()
    assert db.asked == [["a"]]
    db.release()
    assert await first == "A"
    assert await asyncio.gather(*later) == ["B", "C", "B", None]
    assert db.asked == [["a"], ["b", "c", "missing"]]  # one more query for all four


async def test_a_read_asked_after_a_query_went_out_waits_for_a_later_one():
    # Otherwise it could be answered from before a write that was acknowledged before it was asked.
    db = Database({"a": "old"})
    reads = GatheredReads(db.fetch, slots=2)
    first = asyncio.ensure_future(reads.get("a"))
    await settle()
    db.rows["a"] = "new"  # acknowledged now, while the first query is out
    second = asyncio.ensure_future(reads.get("a"))
    await settle()
    assert db.asked == [["a"], ["a"]]
    db.release()
    assert (await first, await second) == ("old", "new")


async def test_a_failed_query_fails_each_of_its_reads_and_the_next_read_is_sent_afresh():
    db = Database({"a": "A"})
    reads = GatheredReads(db.fetch, slots=1)
    db.failure = ConnectionError("server gone")
    failing = [asyncio.ensure_future(reads.get(key)) for key in ("a", "b")]
    db.release()
    for read in failing:
        with pytest.raises(ConnectionError):
            await read
    db.failure = None
    assert await reads.get("a") == "A"


async def test_a_caller_that_leaves_does_not_take_the_others_answers_with_it():
    db = Database({"a": "A", "b": "B"})
    reads = GatheredReads(db.fetch, slots=1)
    leaving, staying = asyncio.ensure_future(reads.get("a")), asyncio.ensure_future(reads.get("b"))
    await settle()
    leaving.cancel()
    db.release()
    assert await staying == "B"
    assert leaving.cancelled()
    assert await reads.get("a") == "A"  # and the reads go on
