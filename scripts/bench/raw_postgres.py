"""The raw PostgreSQL the benchmarks measure the log against, and the databases they run on.

The floor of an append is the log's own rows inserted by the driver the log uses (psycopg 3)
into a plain table like the log's (the same columns, keys and indexes, no trigger, no head
row), with nothing of ours around it, in three ways: `executemany`, which psycopg sends in
pipeline mode (what the log does); one `execute` a row, a round trip each (what pipeline mode
saves); and COPY (the fastest way in, whatever the driver: what the per-row protocol costs).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import psycopg

from events.groupcommit import COLUMNS
from tests.conftest import POSTGRES_SERVER, _postgres_drop, _postgres_storage, postgres_unreachable

TABLE = "raw_events"
INSERT = f"INSERT INTO {TABLE} ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the local server (the tests' way: tests/conftest.py), dropped at the end."""
    if (why := postgres_unreachable()) is not None:
        raise SystemExit(f"{why}: start it, or pass --database URL")
    url = _postgres_storage(None, 0)  # a uniquely named database: it needs no directory
    try:
        yield url
    finally:
        _postgres_drop(url)


def require_empty(url: str) -> None:
    with psycopg.connect(url, connect_timeout=5) as conn:
        (tables,) = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()").fetchone()
    if tables:
        raise SystemExit(f"the database {url} holds {tables} tables: the benchmark needs an empty one")


def describe(url: str) -> str:
    """The server and the settings that decide what a durable commit costs."""
    with psycopg.connect(url) as conn:
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                    for name in ("server_version", "fsync", "synchronous_commit")}
    where = url.rpartition("@")[2].partition("/")[0] or POSTGRES_SERVER
    return (f"PostgreSQL {settings['server_version'].split()[0]} at {where}, fsync={settings['fsync']}, "
            f"synchronous_commit={settings['synchronous_commit']}")


def rows(url: str) -> list[tuple]:
    """Every event of the log in `url`, as rows in INSERT's column order."""
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT {COLUMNS} FROM events ORDER BY position").fetchall()


def _executemany(cursor: psycopg.Cursor, rows: list[tuple]) -> None:
    cursor.executemany(INSERT, rows)


def _execute(cursor: psycopg.Cursor, rows: list[tuple]) -> None:
    for row in rows:
        cursor.execute(INSERT, row)


def _copy(cursor: psycopg.Cursor, rows: list[tuple]) -> None:
    with cursor.copy(f"COPY {TABLE} ({COLUMNS}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


WAYS: dict[str, Callable[[psycopg.Cursor, list[tuple]], None]] = {
    "executemany": _executemany, "execute": _execute, "copy": _copy,
}


def insert(url: str, rows: list[tuple], per_transaction: int, way: str = "executemany") -> float:
    """Seconds to write `rows` into an empty table like the log's, `per_transaction` rows per
    commit (durable as the log's are: the server's settings), each written the `way` named."""
    write = WAYS[way]
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {TABLE} (LIKE events INCLUDING ALL)")
        try:
            started = time.perf_counter()
            for start in range(0, len(rows), per_transaction):
                cursor.execute("BEGIN")
                write(cursor, rows[start:start + per_transaction])
                cursor.execute("COMMIT")
            return time.perf_counter() - started
        finally:
            cursor.execute(f"DROP TABLE {TABLE}")
