"""What only the SQLite backend promises: the file's guards and settings, and sharing it between processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

import events
from events import Meta, RecordedEvent, StorageError, UnknownEventType
from events.envelope import chain_hash, now_rfc3339
from events.sqlite import SqliteLog
from events.types import TaskCreated, TaskOutput
from tests.chain_audit import audit
from tests.server import cli

pytestmark = pytest.mark.sqlite_file

ROOT = Path(__file__).resolve().parent.parent


def created(task_id: str) -> TaskCreated:
    return TaskCreated(task_id=task_id, type="prompt", content="c", project_id="p", created_by="u")


def output(seq: int) -> TaskOutput:
    return TaskOutput(task_id="t", run_id="r", seq=seq, stream="stdout", chunk=f"{seq}\n")


@pytest.fixture
async def open_sqlite(tmp_path) -> AsyncIterator:
    logs: list[SqliteLog] = []

    async def open_(name: str = "log.db", **options) -> SqliteLog:
        log = SqliteLog(tmp_path / name, **options)
        await log.open()
        logs.append(log)
        return log

    yield open_
    for log in logs:
        await log.close()


async def everything(log: SqliteLog) -> list[RecordedEvent]:
    got, after = [], 0
    while page := (await log.read_all(after, 1000)).events:
        got.extend(page)
        after = page[-1].position
    return got


def raw(path: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(path, isolation_level=None))


# --- guards and settings of the file ---------------------------------------------------


@pytest.mark.parametrize("sql", [
    "UPDATE events SET payload = x'7b7d' WHERE position = 1",
    "UPDATE events SET type = 'task.deleted'",
    "DELETE FROM events WHERE position = 2",
    "DELETE FROM events",
    # REPLACE deletes the row it collides with, which fires no delete trigger.
    "INSERT OR REPLACE INTO events SELECT position, stream, version, 'x', payload, meta, recorded_at, hash "
    "FROM events WHERE position = 1",
    "REPLACE INTO events SELECT 99, stream, version, 'x', payload, meta, recorded_at, hash "
    "FROM events WHERE position = 2",
])
async def test_events_table_refuses_changes(open_sqlite, sql):
    log = await open_sqlite()
    await log.append("task-a", [created("a"), output(1)])
    before = await everything(log)
    with raw(log.path) as conn, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute(sql)
    assert await everything(log) == before
    assert audit(before) == 2


async def test_journal_and_sync_settings(open_sqlite):
    durable = await open_sqlite("durable.db")
    with raw(durable.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    # synchronous is a setting of the writer's own connection, which transact runs on.
    assert await durable.transact(lambda tx: tx.execute("PRAGMA synchronous")) == [(2,)]  # FULL
    fast = await open_sqlite("fast.db", durable=False)
    assert await fast.transact(lambda tx: tx.execute("PRAGMA synchronous")) == [(0,)]  # OFF


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_the_data_dir_and_the_log_files_are_private_whatever_the_umask(open_sqlite, tmp_path):
    with umask(0o022):  # the usual default, under which files are world-readable
        log = await open_sqlite("data/log.db")
        await log.append("task-a", [created("a")])
    files = {p.name: mode(p) for p in (tmp_path / "data").iterdir()}
    assert files == {"log.db": 0o600, "log.db-wal": 0o600, "log.db-shm": 0o600}
    assert mode(tmp_path / "data") == 0o700


async def test_query_cannot_write(open_sqlite):
    log = await open_sqlite()
    await log.transact(lambda tx: tx.execute("CREATE TABLE notes (body TEXT)"))
    with pytest.raises(StorageError, match="readonly"):
        await log.query("INSERT INTO notes VALUES ('x')")


async def test_transact_and_query_round_trip(open_sqlite):
    log = await open_sqlite()
    await log.append("task-a", [created("a"), output(1)])

    def setup(tx) -> int:
        tx.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        tx.executemany("INSERT INTO notes (body) VALUES (?)", [("a",), ("é ✓",)])
        return tx.execute("SELECT count(*) FROM notes")[0][0]

    assert await log.transact(setup) == 2
    assert await log.query("SELECT id, body FROM notes ORDER BY id") == [(1, "a"), (2, "é ✓")]
    assert await log.query("SELECT body FROM notes WHERE id = ?", (2,)) == [("é ✓",)]

    def half_done(tx) -> None:
        tx.execute("INSERT INTO notes (body) VALUES ('lost')")
        raise Refused("changed my mind")

    with pytest.raises(Refused):
        await log.transact(half_done)
    assert await log.query("SELECT count(*) FROM notes") == [(2,)]
    assert await log.transact(lambda tx: tx.read_events(0, 10, 10)) == await everything(log)


async def test_a_file_that_is_not_a_database_is_a_storage_error(open_sqlite, tmp_path):
    (tmp_path / "garbage.db").write_bytes(b"this is not a database, it is only text " * 200)
    with pytest.raises(StorageError, match="not a database") as caught:
        await open_sqlite("garbage.db")
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)

    data_dir = tmp_path / "var"
    data_dir.mkdir()
    (data_dir / "mission-control.db").write_bytes((tmp_path / "garbage.db").read_bytes())
    done = cli(data_dir, "token", "list", check=False)
    assert done.returncode == 2 and "the log cannot be read: file is not a database" in done.stderr, done


# --- a projector writing through the writer's connection ------------------------------------
# Its tables are the log's own file: they commit or roll back with the append.


class Refused(Exception):
    pass


def projector_into_seen(refuse_stream: str | None = None):
    """A read model kept in the append's own transaction; it refuses one stream's events."""

    def project(tx, recorded: list[RecordedEvent]) -> None:
        tx.executemany("INSERT INTO seen VALUES (?, ?, ?)", [(e.position, e.stream, e.type) for e in recorded])
        if any(e.stream == refuse_stream for e in recorded):
            raise Refused(refuse_stream)

    return project


async def _with_seen_table(log: SqliteLog) -> None:
    await log.transact(lambda tx: tx.execute(
        "CREATE TABLE seen (position INTEGER PRIMARY KEY, stream TEXT NOT NULL, type TEXT NOT NULL)"
    ))


async def _read_model_equals_log(log: SqliteLog) -> None:
    recorded = await everything(log)
    assert await log.query("SELECT position, stream, type FROM seen ORDER BY position") == [
        (e.position, e.stream, e.type) for e in recorded
    ]
    assert audit(recorded) == log.head


async def test_projector_writes_commit_with_each_append(open_sqlite):
    log = await open_sqlite(projector=projector_into_seen())
    await _with_seen_table(log)
    await log.append("task-a", [created("a"), output(1)])
    await asyncio.gather(*(log.append(f"task-{i}", [created(str(i))] * (1 + i % 3)) for i in range(30)))
    await log.append("task-a", [created("a")], idempotency_key="k")
    await log.append("task-a", [created("a")], idempotency_key="k")  # replayed: nothing new to project
    await _read_model_equals_log(log)


async def test_projector_writes_roll_back_with_a_refused_append(open_sqlite):
    log = await open_sqlite(projector=projector_into_seen(refuse_stream="task-poison"))
    await _with_seen_table(log)
    appends = [log.append(f"task-{i}", [created(str(i)), output(1)]) for i in range(20)]
    appends.insert(7, log.append("task-poison", [created("p"), output(1)]))
    outcomes = await asyncio.gather(*appends, return_exceptions=True)
    assert isinstance(outcomes[7], Refused) and log.head == 40
    await _read_model_equals_log(log)
    with pytest.raises(Refused):
        await log.append("task-poison", [created("p")])
    await log.append("task-after", [created("after")])
    await _read_model_equals_log(log)


async def test_unknown_event_type(open_sqlite):
    log = await open_sqlite()
    await log.append("task-a", [created("a")])
    # A newer writer's type, written beside this code with a correct chain.
    with raw(log.path) as conn:
        previous = conn.execute("SELECT hash FROM events WHERE position = 1").fetchone()[0]
        event = RecordedEvent(
            position=2, stream="task-a", version=2, type="task.teleported",
            payload=msgspec.Raw(b'{"taskId":"a"}'), meta=msgspec.Raw(b'{"schema":1}'),
            recorded_at=now_rfc3339(), hash="",
        )
        row = msgspec.structs.replace(event, hash=chain_hash(previous, event))
        conn.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", (
            row.position, row.stream, row.version, row.type, bytes(row.payload), bytes(row.meta),
            row.recorded_at, row.hash,
        ))

    recorded = await everything(log)
    assert audit(recorded) == 2 and recorded[1] == row  # stored and served unchanged
    with pytest.raises(UnknownEventType, match=r"position 2 has type 'task\.teleported'") as caught:
        events.decode(recorded[1])
    assert caught.value.event == row
    # The log goes on: the next append follows the unknown event in the stream and the chain.
    after = await log.append("task-a", [output(1)], expected=2)
    assert (after[0].position, after[0].version) == (3, 3)
    assert audit(await everything(log)) == 3


# --- two processes, one file ----------------------------------------------------------------


async def test_two_processes_append_to_one_file(open_sqlite):
    log = await open_sqlite("shared.db")
    await log.append("shared", [output(0)], meta=Meta(actor="parent"))
    count = 300

    child_seen: list[RecordedEvent] = []

    async def watch() -> None:
        async with contextlib.aclosing(log.tail(0, streams=["shared"])) as tail:
            async for event in tail:
                if events.decode_meta(event).actor == "child":
                    child_seen.append(event)
                    if len(child_seen) == count:
                        return

    watcher = asyncio.create_task(watch())
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.crash_child", str(log.path), "--count", str(count),
        "--stream", "shared", "--actor", "child", "--pause-after", str(count // 2), cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"ready\n"
        await asyncio.wait_for(child.stdout.readline(), 30)  # the child is appending: start ours
        # Halfway, the child waits for one append of ours, so the writers surely interleave;
        # then both append at once until the child is done.
        lines: list[str] = []  # the child's acknowledged appends
        while (line := (await asyncio.wait_for(child.stdout.readline(), 30)).decode()) != "paused\n":
            lines.append(line)
        await log.append("shared", [output(1)], meta=Meta(actor="parent"))
        finished = asyncio.create_task(child.communicate(b"go\n"))
        mine = 2
        while not finished.done():
            await log.append("shared", [output(mine)], meta=Meta(actor="parent"))
            mine += 1
        out, _ = await finished
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0
    acknowledged = dict(line.split() for line in [*lines, *out.decode().splitlines()])

    # Every child event reaches the parent's tail (the file is polled, so allow a moment).
    await asyncio.wait_for(watcher, 5)
    recorded = await everything(log)
    assert audit(recorded) == len(recorded) == await log.read_head() == 1 + (count - 1) + mine
    assert [e.version for e in recorded] == list(range(1, len(recorded) + 1))  # one stream
    by_actor = {"parent": [], "child": []}
    for event in recorded:
        by_actor[events.decode_meta(event).actor].append(event)
    assert len(by_actor["parent"]) == mine and len(by_actor["child"]) == count
    assert {str(e.position): e.hash for e in by_actor["child"]}.items() >= acknowledged.items()
    assert len(acknowledged) == count - 1  # the first line was read above
    assert child_seen == by_actor["child"]
    # The two writers really interleaved in the one chain.
    child_positions = [e.position for e in by_actor["child"]]
    assert any(child_positions[0] < e.position < child_positions[-1] for e in by_actor["parent"])


# --- a projector refusing one append of a batch ------------------------------------------
# The batch is then committed append by append. These place what could happen between those
# commits (another process's append, a lock timeout) by wrapping the writer's `_commit`.


def refuses(stream: str):
    def projector(tx, recorded):
        if any(e.stream == stream for e in recorded):
            raise RuntimeError(f"the projector refuses {stream}")

    return projector


async def test_an_append_by_another_process_between_fallback_commits_still_reaches_tails(open_sqlite):
    log = await open_sqlite(projector=refuses("bad"))
    other = await open_sqlite()  # the same file: another process's log
    await log.append("s0", [created("0")])
    single_commit = log._commit

    def commit(batch):
        outcome = single_commit(batch)
        if [a.stream for a in batch] == ["s1"]:
            other._commit(other_append)  # lands right after s1's own commit
        return outcome

    other_append = [events.sqlite._Append("other", [("task.created", events.canonical_json(created("o")), 1)],
                                          None, Meta(), None, None, None)]
    log._commit = commit
    outcomes = await asyncio.gather(
        log.append("s1", [created("1")]), log.append("bad", [created("2")]), log.append("s2", [created("3")]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], RuntimeError)
    stored = [e.stream for e in await everything(log)]
    assert stored == ["s0", "s1", "other", "s2"]
    seen: list[str] = []

    async def follow():
        async for event in log.tail(0):
            seen.append(event.stream)
            if len(seen) == len(stored):
                return

    await asyncio.wait_for(follow(), 5)
    assert seen == stored


async def test_appends_committed_before_a_fallback_failure_are_reported_committed(open_sqlite):
    log = await open_sqlite(projector=refuses("bad"))
    single_commit = log._commit

    def commit(batch):
        if [a.stream for a in batch] == ["s2"]:
            raise sqlite3.OperationalError("database is locked")  # BEGIN IMMEDIATE timed out
        return single_commit(batch)

    log._commit = commit
    first, bad, second = await asyncio.gather(
        log.append("s1", [created("1")]), log.append("bad", [created("2")]), log.append("s2", [created("3")]),
        return_exceptions=True,
    )
    assert [e.stream for e in first] == ["s1"]  # committed, and told so: a retry would duplicate it
    assert isinstance(bad, RuntimeError)  # the projector's own error, as it raised it
    assert isinstance(second, StorageError) and isinstance(second.__cause__, sqlite3.OperationalError)
    assert [e.stream for e in await everything(log)] == ["s1"]
