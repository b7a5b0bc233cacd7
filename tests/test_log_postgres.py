"""What only the PostgreSQL backend promises: the database's guards, and refusing a database that
is not its own or is newer than it (issue 15). The contracts every backend keeps are
tests/test_log_contract.py's and tests/test_readmodels_contract.py's, run on PostgreSQL too. Every
command that takes --database refuses a bad one (unreachable, missing, another app's, newer) in one
sentence, writing nothing."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from events import StorageError
from events.postgres import SCHEMA_VERSION, PostgresLog
from events.types import TaskCreated
from tests.conftest import POSTGRES_SERVER
from tests.server import free_port
from tests.test_cli import FIXTURE, one_sentence, run


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


async def test_a_read_whose_caller_leaves_mid_statement_leaves_every_reader_usable(postgres_database):
    # Reads run on the event loop: a request cancelled (its client gone) while its read is on the
    # wire must not hand the next read a connection still busy with that statement (psycopg
    # cancels it on the server and leaves the connection idle).
    log = await opened(postgres_database)
    try:
        await log.append("task-a", [created("a")])
        for _ in range(2):  # as many as the log has readers: each is cut off once
            slow = asyncio.ensure_future(log.query("SELECT pg_sleep(2)"))
            await asyncio.sleep(0.3)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
        reads = [asyncio.wait_for(log.query("SELECT stream FROM events"), 10) for _ in range(6)]
        assert await asyncio.gather(*reads) == [[("task-a",)]] * 6
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


# --- bad configuration, for every command that takes --database ---------------------------------


def _closed_port(url: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/test"


def _no_database(url: str) -> str:
    return f"{url}_absent"


def _no_user(url: str) -> str:
    return url.replace("postgres@", "mc_no_such_role@")


def _foreign_tables(url: str) -> str:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total BIGINT)")
        conn.execute("INSERT INTO invoices VALUES (1, 100)")
    return url


def _newer_schema(url: str) -> str:
    run("import", str(FIXTURE), "--database", url, "--data-dir", "unused").check_returncode()
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE mission_control SET schema_version = %s", (SCHEMA_VERSION + 1,))
    return url


def contents(url: str) -> dict[str, str]:
    """Every table of the database with a digest of its rows: what a refused command must leave as it was."""
    with psycopg.connect(url) as conn:
        return {name: conn.execute(
            f"SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {name} t"
        ).fetchone()[0] for name in tables(url)}


def database_exists(name: str) -> bool:
    with psycopg.connect(f"{POSTGRES_SERVER}/test") as conn:
        return conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()[0] == 1


COMMANDS = {
    "serve": lambda: ["serve", "--port", str(free_port())],
    "token-create": lambda: ["token", "create", "--user", "alice", "--scopes", "admin"],
    "verify": lambda: ["verify"],
    "export": lambda: ["export"],
    "import": lambda: ["import", str(FIXTURE)],
    "rebuild": lambda: ["rebuild"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("fault", [_closed_port, _no_database, _no_user, _foreign_tables, _newer_schema],
                         ids=["closed-port", "no-database", "no-user", "foreign-tables", "newer-schema"])
def test_a_bad_database_is_refused_in_one_sentence_and_left_untouched(fault, command, postgres_database, tmp_path):
    url = fault(postgres_database)
    before = contents(postgres_database)
    refused = run(*COMMANDS[command](), "--database", url, "--data-dir", str(tmp_path / "data"))
    sentence = one_sentence(refused)
    assert "Traceback" not in refused.stdout and not refused.stdout.strip() or command == "export", refused.stdout
    assert {
        _closed_port: "Connection refused", _no_database: "does not exist", _no_user: 'role "mc_no_such_role"',
        _foreign_tables: "1 tables that are not a Mission Control log", _newer_schema: "newer than this",
    }[fault] in sentence
    assert contents(postgres_database) == before
    assert not database_exists(_no_database(postgres_database).rpartition("/")[2])  # none made where there was none
    assert not (tmp_path / "data" / "admin-token").exists()
