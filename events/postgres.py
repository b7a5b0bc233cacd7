"""The PostgreSQL backend of the log: one database that any number of processes append to.

Positions are gapless and in commit order: every append transaction first locks the one row
of `head` (`SELECT ... FOR UPDATE`), which holds the last position and hash, numbers and
chains its events from it and moves it before committing. So transactions that append
commit one after another, and a reader that sees position n sees every position before it.
A sequence would not do: a later number can commit before an earlier one.

Writes go through one writer thread with a psycopg connection, committing whatever appends
are waiting as one transaction (group commit, events/groupcommit.py); the projector runs in it
with this backend's handle, as on SQLite. Reads run on the event loop,
each on one of a few autocommit async connections taken from a free list: a thread hop per read
cost twice the CPU of the read itself (measured: 148 against 69 us). A read whose caller leaves
half-way (its client gone) psycopg cancels, on the server too, leaving its connection idle for
the next. Commits by other processes reach this one's tails
by LISTEN/NOTIFY on a connection of its own, with polling as the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import pq

from events.envelope import GENESIS_HASH, RecordedEvent
from events.groupcommit import COLUMNS, GroupCommitLog, _Append, _Outcome, _ProjectorFailed, row_event
from events.log import LogClosed, Page, Projector, StorageError, TypeFilter
from events.verify import Chain

T = TypeVar("T")
logger = logging.getLogger("mission_control.log")

CHANNEL = "mission_control_log"
"""Notified by every append transaction, at its commit."""

SCHEMA_VERSION = 1
"""The version of the tables below (and the read models'), kept in the table `mission_control`:
a node refuses a database whose schema is newer than the one it knows."""

SCHEMA = [
    """CREATE TABLE mission_control (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        schema_version INTEGER NOT NULL
    )""",
    f"INSERT INTO mission_control VALUES (1, {SCHEMA_VERSION})",
    """CREATE TABLE events (
        position BIGINT PRIMARY KEY,
        stream TEXT NOT NULL,
        version BIGINT NOT NULL,
        type TEXT NOT NULL,
        payload BYTEA NOT NULL,
        meta BYTEA NOT NULL,
        recorded_at TEXT NOT NULL,
        hash TEXT NOT NULL,
        UNIQUE (stream, version)
    )""",
    """CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS
       $$ BEGIN RAISE EXCEPTION 'the event log is append-only'; END $$""",
    """CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
       FOR EACH ROW EXECUTE FUNCTION events_append_only()""",
    """CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
       FOR EACH STATEMENT EXECUTE FUNCTION events_append_only()""",
    # The chain's tail, locked by every transaction that appends.
    """CREATE TABLE head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        position BIGINT NOT NULL,
        hash TEXT NOT NULL
    )""",
    f"INSERT INTO head VALUES (1, 0, '{GENESIS_HASH}')",
    # Keys as bytes: the service joins their parts with NUL, which PostgreSQL's text cannot hold.
    """CREATE TABLE idempotency (
        key BYTEA PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        first_position BIGINT NOT NULL,
        last_position BIGINT NOT NULL
    )""",
]

_CONNECTION = dict(connect_timeout=5, keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3)
LISTEN_PROBE_SECONDS = 5.0
"""With no notification for this long, the listener's connection is asked a cheap query: a
connection that died unnoticed (its server restarted or killed it) is then made again."""

_INSERT = f"INSERT INTO events ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
_IDLE = pq.TransactionStatus.IDLE


class _Tx:
    """The Transaction a projector sees: the writer's connection inside the append's
    transaction. The PostgreSQL read models (projections/postgres.py) write through `execute`
    and `executemany`."""

    def __init__(self, conn: psycopg.Connection):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cursor = self._conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            with self._conn.cursor() as cursor:
                cursor.executemany(sql, rows)

    def pipeline(self) -> contextlib.AbstractContextManager:
        """Statements whose answers nobody reads, sent together: one round trip at the end of the
        block instead of one each (an error in any is raised there)."""
        return self._conn.pipeline()

    def read_events(self, after: int, until: int, limit: int) -> list[RecordedEvent]:
        rows = self._conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE position > %s AND position <= %s ORDER BY position LIMIT %s",
            (after, until, limit),
        ).fetchall()
        return [row_event(r) for r in rows]


def _storable(names: Iterable[str]) -> list[str]:
    """The names a column of text can hold: one with a NUL names nothing stored (PostgreSQL's text
    cannot hold NUL, and refuses it as a parameter)."""
    return [name for name in names if "\x00" not in name]


def _filters(streams: Sequence[str] | None, types: TypeFilter | None) -> tuple[str, list[Any]]:
    sql, params = [], []
    if streams is not None:  # [] matches nothing
        sql.append("stream = ANY(%s)")
        params.append(_storable(streams))
    if types is not None:
        alternatives = []
        if exact := _storable(types.exact):
            alternatives.append("type = ANY(%s)")
            params.append(sorted(exact))
        for prefix in _storable(types.prefixes):
            alternatives.append("starts_with(type, %s)")
            params.append(prefix)
        sql.append("(" + (" OR ".join(alternatives) or "FALSE") + ")")
    return "".join(f" AND {s}" for s in sql), params


def _storage_error(error: BaseException) -> BaseException:
    """psycopg's errors as the log's StorageError (the original its cause); the log's own
    errors, and a projector's, as they are."""
    if isinstance(error, psycopg.Error):
        translated = StorageError(" ".join(str(error).split()) or type(error).__name__)  # one line
        translated.__cause__ = error
        return translated
    return error


@contextlib.contextmanager
def _translated():
    try:
        yield
    except psycopg.Error as exc:
        raise _storage_error(exc) from exc


def _key(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def _lock_key(name: str) -> int:
    """An advisory lock's key: the name's digest as a signed 64-bit integer."""
    return int.from_bytes(hashlib.sha256(f"mission-control:{name}".encode()).digest()[:8], "big", signed=True)


def _in_transaction(conn: psycopg.Connection) -> bool:
    """Whether a ROLLBACK is owed (never on a connection that broke: there is nothing to roll back)."""
    return not conn.closed and not conn.broken and conn.info.transaction_status != _IDLE


def open_log(url: str, **options) -> PostgresLog:
    """`postgresql://user@host:port/database` (or `postgres://...`)."""
    return PostgresLog(url, **options)


class PostgresLog(GroupCommitLog):
    backend = "postgres"
    _storage_error = staticmethod(_storage_error)

    def __init__(
        self,
        url: str,
        *,
        projector: Projector | None = None,
        durable: bool = True,
        readers: int = 2,
        poll_interval: float = 0.2,
        max_batch: int = 2000,
    ):
        super().__init__(projector=projector, max_batch=max_batch)
        self.url = url
        self.durable = durable
        self.poll_interval = poll_interval
        self.readers = readers
        """Reads of the tables beside the log that may be out at once, each on a connection of its own."""
        self._free_readers: asyncio.Queue[psycopg.AsyncConnection | None] = asyncio.Queue()
        for _ in range(readers):
            self._free_readers.put_nowait(None)  # connected at its first read
        self._reader_conns: set[psycopg.AsyncConnection] = set()
        self._conn: psycopg.Connection | None = None
        self._tasks: list[asyncio.Task] = []
        self._lock_conns: dict[str, psycopg.Connection] = {}

    # --- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        with _translated():
            await loop.run_in_executor(self._writer_thread, self._open_writer)
        self._head = await self.read_head()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="mc-log-writer"),
            asyncio.create_task(self._watch_other_writers(), name="mc-log-watch"),
        ]

    def _options(self, role: str) -> dict[str, Any]:
        """How every connection is made: failing within seconds when the server is away, and with
        TCP keepalives, so one whose server vanished without a word is found dead, not waited on.
        The application name tells this process's connections apart in pg_stat_activity."""
        return dict(autocommit=True, application_name=f"mission-control-{role} {os.getpid()}", **_CONNECTION)

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, **self._options("log"))

    def connect(self, role: str) -> psycopg.Connection:
        """A connection of its own to the log's database (autocommit), made as the log's are: for a
        store beside the log whose writes are no part of an append (service/artifacts/postgres.py)."""
        with _translated():
            return psycopg.connect(self.url, **self._options(role))

    def _open_writer(self) -> None:
        conn = self._connect()
        try:
            if not self.durable:  # a crash may lose the last commits, never corrupt the log
                conn.execute("SET synchronous_commit = off")
            with conn.transaction():
                self._prepare_schema(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _prepare_schema(self, conn: psycopg.Connection) -> None:
        """Create the log's tables in an empty database; in one that holds them, check that
        this code knows their version. A database holding anything else is refused, untouched."""
        # One process at a time: nodes starting together on an empty database create it once.
        conn.execute("SELECT pg_advisory_xact_lock(7262795041)")
        if conn.execute("SELECT to_regclass('mission_control')").fetchone()[0] is None:
            tables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchone()[0]
            if tables:
                raise StorageError(
                    f"the database {conn.info.dbname} holds {tables} tables that are not a Mission Control log; "
                    "give Mission Control an empty database of its own"
                )
            for statement in SCHEMA:
                conn.execute(statement)
            return
        (version,) = conn.execute("SELECT schema_version FROM mission_control").fetchone()
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"the database {conn.info.dbname} has schema version {version}, newer than this Mission Control "
                f"knows ({SCHEMA_VERSION}): run a newer release on it"
            )

    def _writer(self) -> psycopg.Connection:
        """The writer's connection, made again if the last one broke (the server restarted)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._open_writer()
        assert self._conn is not None
        return self._conn

    def _begin(self, streams: Sequence[str] = ()) -> tuple[psycopg.Connection, int, str, dict[str, int]]:
        """The writer's connection in a new transaction holding the head's lock (appends commit one
        at a time): the chain's tail (position, hash) and the versions of those of `streams` that
        have events, as of that tail, in one round trip. A connection found broken only now (the
        server restarted since its last use) is made again once: nothing was written on it yet."""
        conn = self._writer()
        try:
            return conn, *self._lock_head(conn, streams)
        except psycopg.OperationalError:
            if not conn.broken:
                raise
            conn = self._writer()
            return conn, *self._lock_head(conn, streams)

    @staticmethod
    def _lock_head(conn: psycopg.Connection, streams: Sequence[str]) -> tuple[int, str, dict[str, int]]:
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                head = conn.execute("SELECT position, hash FROM head WHERE id = 1 FOR UPDATE")
                # Each by the (stream, version) index, newest first; run once the lock is held, so as of the tail.
                versions = conn.execute(
                    "SELECT name, (SELECT version FROM events WHERE stream = name ORDER BY version DESC LIMIT 1) "
                    "FROM unnest(%s::text[]) AS name", (list(streams),),
                ) if streams else None
            row = head.fetchone()
            if row is None:
                raise StorageError("the database's log has no head row: it is not a Mission Control log")
            found = {} if versions is None else {name: v for name, v in versions.fetchall() if v is not None}
            return row[0], row[1], found
        except BaseException:  # the next transaction must not begin inside this one
            if _in_transaction(conn):
                conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        for task in self._tasks:
            if task.get_name() == "mc-log-writer":
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # drains what was accepted before closing
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        loop = asyncio.get_running_loop()
        for reader in list(self._reader_conns):
            await self._discard(reader)
        for conn in self._lock_conns.values():
            conn.close()  # a lock still held goes with its session
        if self._conn is not None:
            await loop.run_in_executor(self._writer_thread, self._conn.close)
        self._writer_thread.shutdown(wait=True)

    # --- locks shared by the nodes on this database ----------------------------------

    async def _acquire(self, name: str) -> None:
        """A session advisory lock, on a connection of the lock's own: the database gives it back
        when that session ends, with the node that held it."""

        def take() -> None:
            conn = self._lock_conns.get(name)
            if conn is None or conn.closed or conn.broken:
                conn = self._lock_conns[name] = self._connect()
            conn.execute("SELECT pg_advisory_lock(%s)", (_lock_key(name),))

        with _translated():
            await asyncio.to_thread(take)

    async def _release(self, name: str) -> None:
        def give() -> None:
            conn = self._lock_conns[name]
            try:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_lock_key(name),))
            except psycopg.Error:  # what was decided under it stands: ending the session frees the lock
                logger.warning("could not release the advisory lock %r; closing its session", name, exc_info=True)
                conn.close()

        await asyncio.to_thread(give)

    # --- appends -----------------------------------------------------------------

    def _commit(self, batch: list[_Append]) -> list[_Outcome]:
        conn, position, previous, versions = self._begin(list(dict.fromkeys(append.stream for append in batch)))
        try:
            staged = self._staged(
                batch, position, previous,
                stream_versions=lambda names: {name: versions[name] for name in names if name in versions},
                recorded_for_key=lambda key: self._recorded_for_key(conn, key),
            )
            with conn.pipeline():  # nothing reads what these answer: one round trip for them all
                if staged.rows:
                    with conn.cursor() as cursor:
                        cursor.executemany(_INSERT, staged.rows)
                    conn.execute("UPDATE head SET position = %s, hash = %s WHERE id = 1", (staged.head, staged.hash))
                    conn.execute(f"NOTIFY {CHANNEL}")
                if staged.keys:
                    with conn.cursor() as cursor:
                        cursor.executemany(
                            "INSERT INTO idempotency VALUES (%s, %s, %s, %s)",
                            [(_key(key), *rest) for key, *rest in staged.keys],
                        )
            if self.projector is not None and staged.rows:
                try:
                    self.projector(_Tx(conn), staged.fresh())
                except Exception as exc:
                    if len(batch) > 1:
                        raise _ProjectorFailed from exc
                    conn.execute("ROLLBACK")
                    return [_Outcome.failed(exc)]
            conn.execute("COMMIT")
            self._remember(staged.versions, staged.head)
            return staged.outcomes
        except BaseException:
            if _in_transaction(conn):
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _stream_version(conn: psycopg.Connection, stream: str) -> int:
        row = conn.execute(
            "SELECT version FROM events WHERE stream = %s ORDER BY version DESC LIMIT 1", (stream,)
        ).fetchone()
        return row[0] if row else 0

    @staticmethod
    def _recorded_for_key(conn: psycopg.Connection, key: str):
        found = conn.execute(
            "SELECT fingerprint, first_position, last_position FROM idempotency WHERE key = %s", (_key(key),)
        ).fetchone()
        if found is None:
            return None
        rows = conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE position BETWEEN %s AND %s ORDER BY position", found[1:]
        ).fetchall()
        return found[0], [row_event(r) for r in rows]

    async def import_recorded(self, events: Iterable[RecordedEvent]) -> int:
        if self._closed:
            raise LogClosed("the log is closed")
        loop = asyncio.get_running_loop()
        with _translated():
            self._committed(await loop.run_in_executor(self._writer_thread, self._import, events))
        return self._head

    def _import(self, events: Iterable[RecordedEvent], chunk: int = 5000) -> list[RecordedEvent]:
        """Runs on the writer thread, in one transaction: a broken event leaves nothing behind.
        Returns the last chunk written, for the tail."""
        conn, position, previous, _ = self._begin()
        try:
            chain = Chain(position, previous, version_of=lambda stream: self._stream_version(conn, stream))
            batch: list[RecordedEvent] = []
            written: list[RecordedEvent] = []
            for event in events:
                chain.extend(event)
                batch.append(event)
                if len(batch) == chunk:
                    self._write_recorded(conn, batch)
                    written, batch = batch, []
            if batch:
                self._write_recorded(conn, batch)
                written = batch
            if written:
                conn.execute(
                    "UPDATE head SET position = %s, hash = %s WHERE id = 1", (written[-1].position, written[-1].hash)
                )
                conn.execute(f"NOTIFY {CHANNEL}")
            conn.execute("COMMIT")
            return written
        except BaseException:
            if _in_transaction(conn):
                conn.execute("ROLLBACK")
            raise

    def _write_recorded(self, conn: psycopg.Connection, batch: list[RecordedEvent]) -> None:
        with conn.cursor() as cursor:
            cursor.executemany(_INSERT, [
                (e.position, e.stream, e.version, e.type, bytes(e.payload), bytes(e.meta), e.recorded_at, e.hash)
                for e in batch
            ])
        if self.projector is not None:
            self.projector(_Tx(conn), batch)

    async def transact(self, fn: Callable[[_Tx], T]) -> T:
        """Run fn in a write transaction of its own, serialised with appends everywhere: it
        holds the head's lock (the PostgreSQL read models create, refold and rebuild so)."""

        def run() -> T:
            conn, *_ = self._begin()
            try:
                result = fn(_Tx(conn))
                conn.execute("COMMIT")
            except BaseException:
                if _in_transaction(conn):
                    conn.execute("ROLLBACK")
                raise
            return result

        with _translated():
            return await asyncio.get_running_loop().run_in_executor(self._writer_thread, run)

    # --- reads -----------------------------------------------------------------

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """A read of the tables kept beside the log (projections/postgres.py's read models). A read
        is tried once more on a new connection if the old one is found broken by it: reads repeat
        safely, and the first after the server restarted need not fail."""
        conn = await self._free_readers.get()
        try:
            with _translated():
                conn = await self._connected(conn)
                try:
                    return await (await conn.execute(sql, params)).fetchall()
                except psycopg.OperationalError:
                    if not conn.broken:
                        raise
                    conn = await self._connected(conn)
                    return await (await conn.execute(sql, params)).fetchall()
        finally:
            self._free_readers.put_nowait(conn)

    async def _connected(self, conn: psycopg.AsyncConnection | None) -> psycopg.AsyncConnection:
        """`conn`, or a new connection in place of a missing, closed or broken one."""
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            await self._discard(conn)
        conn = await psycopg.AsyncConnection.connect(self.url, **self._options("log"))
        self._reader_conns.add(conn)
        return conn

    async def _discard(self, conn: psycopg.AsyncConnection) -> None:
        self._reader_conns.discard(conn)
        with contextlib.suppress(psycopg.Error):
            await conn.close()

    async def read_head(self) -> int:
        rows = await self.query("SELECT position FROM head WHERE id = 1")
        if not rows:
            raise StorageError("the database's log has no head row: it is not a Mission Control log")
        return rows[0][0]

    async def read_all(self, after=0, limit=500, *, streams=None, types=None, until=None) -> Page:
        if until is None:
            until = await self.read_head()
        where, params = _filters(streams, types)
        rows = await self.query(
            f"SELECT {COLUMNS} FROM events WHERE position > %s AND position <= %s{where} "
            "ORDER BY position LIMIT %s",
            [after, until, *params, limit],
        )
        return Page.read([row_event(r) for r in rows], after, until, limit)

    async def read_stream(self, stream, after_version=0, *, types=None, until_position=None, limit=None):
        where, params = _filters(None, types)
        if until_position is not None:
            where += " AND position <= %s"
            params.append(until_position)
        rows = await self.query(
            f"SELECT {COLUMNS} FROM events WHERE stream = %s AND version > %s{where} ORDER BY version LIMIT %s",
            [stream, after_version, *params, limit],
        )
        return [row_event(r) for r in rows]

    async def last_event(self, stream: str) -> RecordedEvent | None:
        rows = await self.query(
            f"SELECT {COLUMNS} FROM events WHERE stream = %s ORDER BY version DESC LIMIT 1", (stream,)
        )
        return row_event(rows[0]) if rows else None

    async def idempotent(self, key: str):
        rows = await self.query(
            "SELECT fingerprint, first_position, last_position FROM idempotency WHERE key = %s", (_key(key),)
        )
        if not rows:
            return None
        fingerprint, first, last = rows[0]
        page = await self.read_all(first - 1, last - first + 1, until=last)
        return fingerprint, page.events

    async def _watch_other_writers(self) -> None:
        """Other processes' commits reach this one's tails: woken by NOTIFY on a connection of
        its own, and looking every `poll_interval` anyway (a notification lost with a broken
        connection, or a commit made before LISTEN). A listener quiet for LISTEN_PROBE_SECONDS
        is probed; one found dead is made again. Losing the database is logged once, and so is
        finding it again."""
        listener: psycopg.AsyncConnection | None = None
        lost: str | None = None  # why the database was last lost, until it is back
        loop = asyncio.get_running_loop()
        heard = loop.time()
        try:
            while True:
                try:
                    if listener is None or listener.closed or listener.broken:
                        listener = await psycopg.AsyncConnection.connect(self.url, **self._options("listen"))
                        await listener.execute(f"LISTEN {CHANNEL}")
                        heard = loop.time()
                    async for _ in listener.notifies(timeout=self.poll_interval, stop_after=1):
                        heard = loop.time()
                    if loop.time() - heard >= LISTEN_PROBE_SECONDS:
                        await asyncio.wait_for(listener.execute("SELECT 1"), LISTEN_PROBE_SECONDS)
                        heard = loop.time()
                    head = await self.read_head()
                    while self._head < head:
                        page = await self.read_all(self._head, self.recent_capacity, until=head)
                        self._committed(page.events)
                    if lost is not None:
                        logger.warning("reached the database again; following the log's head")
                        lost = None
                except Exception as exc:  # the server away for a moment: look again, never stop watching
                    if listener is not None:  # broken, or a probe that timed out: never trusted again
                        with contextlib.suppress(Exception):
                            await listener.close()
                        listener = None
                    if lost is None:
                        lost = " ".join(str(exc).split()) or type(exc).__name__
                        logger.warning("lost the database (%s); reconnecting every %s s", lost, self.poll_interval)
                    await asyncio.sleep(self.poll_interval)
        finally:
            if listener is not None:
                await listener.close()
