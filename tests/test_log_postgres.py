"""What only the PostgreSQL backend promises: the database's guards, and refusing a database that
is not its own or is newer than it (issue 15). The contracts every backend keeps are
tests/test_log_contract.py's and tests/test_readmodels_contract.py's, run on PostgreSQL too."""

from __future__ import annotations

import psycopg
import pytest

from events import StorageError
from events.postgres import SCHEMA_VERSION, PostgresLog
from events.types import TaskCreated
from tests.test_cli import one_sentence, run


def created(task_id: str) -> TaskCreated:
    return TaskCreated(task_id=task_id, type="prompt", content="c", project_id="p", created_by="u")


async def opened(url: str) -> PostgresLog:
    log = PostgresLog(url)
    await log.open()
    return log


def tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename"
        )]


async def test_the_events_table_refuses_updates_deletes_and_truncation(postgres_database):
    log = await opened(postgres_database)
    try:
        await log.append("task-a", [created("a")])
    finally:
        await log.close()
    for statement in ("UPDATE events SET type = 'x'", "DELETE FROM events", "TRUNCATE events"):
        with psycopg.connect(postgres_database) as conn, pytest.raises(psycopg.Error, match="append-only"):
            conn.execute(statement)
    log = await opened(postgres_database)
    try:
        assert [e.stream for e in (await log.read_all()).events] == ["task-a"]
    finally:
        await log.close()


async def test_a_database_holding_anything_else_is_refused_untouched(postgres_database):
    with psycopg.connect(postgres_database) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    with pytest.raises(StorageError, match="1 tables that are not a Mission Control log"):
        await opened(postgres_database)
    assert tables(postgres_database) == ["invoices"]
    assert "not a Mission Control log" in one_sentence(run("verify", "--database", postgres_database))
    assert tables(postgres_database) == ["invoices"]


async def test_a_schema_newer_than_this_code_is_refused(postgres_database):
    log = await opened(postgres_database)
    await log.close()
    with psycopg.connect(postgres_database) as conn:
        conn.execute("UPDATE mission_control SET schema_version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StorageError, match=f"schema version {SCHEMA_VERSION + 1}, newer than"):
        await opened(postgres_database)
    assert "newer than this Mission Control knows" in one_sentence(run("token", "list", "--database", postgres_database))
