"""Artifact bytes in the PostgreSQL database of the log, so that every node serves every artifact
and a backup of the database holds them: chunks of 1 MiB in `artifact_chunks`, keyed by the
artifact's SHA-256 and their order, and one `artifact_blobs` row per artifact, written last.

Rows of bytea rather than large objects: a large object is one per artifact with an OID to keep
track of, outside the rows that name it, needs `lo_unlink` (or vacuumlo) and privileges of its own,
and is easy to leave behind; chunk rows are plain rows that a transaction writes or does not, that
`pg_dump` carries, and that a reader takes one at a time without holding a transaction open.

An upload streams its chunks into one transaction of its own connection under a temporary key
and, once the hash is known, renames them to it and records the blob in the same commit: a
failure (too large, the disk full, the connection gone) rolls everything back, and the bytes of an
artifact stored twice are kept once (ON CONFLICT: the second upload rolls back). Reads are single
statements on the log's reader threads."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable, AsyncIterator

import psycopg
from psycopg import errors

from events import StorageError
from events.postgres import PostgresLog
from service.artifacts import ArtifactStore, Full, Hashing, NotStored, Stored, rechunked

SCHEMA = [
    'CREATE TABLE IF NOT EXISTS artifact_blobs (sha256 TEXT COLLATE "C" PRIMARY KEY, size BIGINT NOT NULL, '
    "chunks INTEGER NOT NULL)",
    'CREATE TABLE IF NOT EXISTS artifact_chunks (sha256 TEXT COLLATE "C" NOT NULL, seq INTEGER NOT NULL, '
    "data BYTEA NOT NULL, PRIMARY KEY (sha256, seq))",
    # Compressing what is mostly compressed already (archives, images) costs time for nothing.
    "ALTER TABLE artifact_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
]


def open_store(log: PostgresLog) -> PostgresStore:
    return PostgresStore(log)


class PostgresStore(ArtifactStore):
    def __init__(self, log: PostgresLog):
        self.log = log

    async def prepare(self) -> None:
        def create(tx) -> None:  # in the log's transaction (its head locked): nodes starting together
            for statement in SCHEMA:
                tx.execute(statement)

        await self.log.transact(create)

    async def close(self) -> None:
        """Nothing of its own: each upload's connection is closed with it."""

    async def put(self, chunks: AsyncIterable[bytes], limit: int) -> Stored:
        hashing = Hashing(limit)
        pending = f"upload-{uuid.uuid4().hex}"  # no SHA-256 looks like it
        conn = await asyncio.to_thread(self.log.connect, "artifacts")
        try:
            await asyncio.to_thread(conn.execute, "BEGIN")
            seq = 0
            async for chunk in rechunked(chunks):
                hashing.add(chunk)
                await asyncio.to_thread(
                    conn.execute, "INSERT INTO artifact_chunks VALUES (%s, %s, %s)", (pending, seq, chunk))
                seq += 1
            stored = hashing.stored()
            await asyncio.to_thread(self._commit, conn, pending, stored, seq)
            return stored
        except errors.DiskFull:
            raise Full("The database holding the artifacts is out of space.") from None
        except psycopg.Error as exc:
            raise StorageError(" ".join(str(exc).split()) or type(exc).__name__) from exc
        finally:
            await asyncio.to_thread(conn.close)  # an open transaction rolls back with it

    @staticmethod
    def _commit(conn: psycopg.Connection, pending: str, stored: Stored, chunks: int) -> None:
        fresh = conn.execute(
            "INSERT INTO artifact_blobs VALUES (%s, %s, %s) ON CONFLICT (sha256) DO NOTHING RETURNING sha256",
            (stored.sha256, stored.size, chunks),
        ).fetchall()
        if not fresh:  # the same bytes are kept once
            conn.execute("ROLLBACK")
            return
        conn.execute("UPDATE artifact_chunks SET sha256 = %s WHERE sha256 = %s", (stored.sha256, pending))
        conn.execute("COMMIT")

    async def has(self, sha256: str) -> bool:
        return bool(await self.log.query("SELECT 1 FROM artifact_blobs WHERE sha256 = %s", (sha256,)))

    async def get(self, sha256: str) -> AsyncIterator[bytes]:
        blob = await self.log.query("SELECT chunks FROM artifact_blobs WHERE sha256 = %s", (sha256,))
        if not blob:
            raise NotStored(sha256)
        for seq in range(blob[0][0]):
            rows = await self.log.query(
                "SELECT data FROM artifact_chunks WHERE sha256 = %s AND seq = %s", (sha256, seq))
            if not rows:  # a chunk deleted behind the store's back: what verify is there to find
                return
            yield bytes(rows[0][0])
