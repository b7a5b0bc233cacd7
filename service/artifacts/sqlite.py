"""Artifact bytes beside a SQLite log: files in the data dir, `<data>/artifacts/ab/abcdef…` by their
SHA-256. Each is written to a temporary file (`artifacts/tmp/`), fsync'd, renamed into place and its
directory fsync'd before `put` returns, so an event appended after it never names lost bytes; a
failure removes the temporary file, so nothing half-written is ever seen under a hash."""

from __future__ import annotations

import asyncio
import errno
import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from events.sqlite import SqliteLog
from service.artifacts import CHUNK_BYTES, ArtifactStore, Full, Hashing, NotStored, Stored, rechunked

NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
STALE_SECONDS = 24 * 3600
"""A temporary file untouched this long was left by a process killed mid-upload."""


def open_store(log: SqliteLog) -> FileStore:
    return FileStore(log.path.parent / "artifacts")


def _flushed(out) -> None:
    out.flush()
    os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = root
        self.tmp = root / "tmp"

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    async def prepare(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        stale = time.time() - STALE_SECONDS  # not just older than now: another node may be uploading
        for left in self.tmp.iterdir():  # a process killed mid-upload: nothing names these bytes
            if left.stat().st_mtime < stale:
                left.unlink(missing_ok=True)

    async def close(self) -> None:
        pass

    async def put(self, chunks: AsyncIterable[bytes], limit: int) -> Stored:
        hashing = Hashing(limit)
        partial = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(partial, "xb") as out:  # buffered: its write() writes all or raises, never writes short
                async for chunk in rechunked(chunks):
                    hashing.add(chunk)
                    await asyncio.to_thread(out.write, chunk)
                stored = hashing.stored()
                await asyncio.to_thread(_flushed, out)
            await asyncio.to_thread(self._place, partial, stored.sha256)
            return stored
        except OSError as exc:
            if exc.errno in NO_ROOM:
                raise Full(f"The artifact store at {self.root} is out of space.") from None
            raise
        finally:
            partial.unlink(missing_ok=True)

    def _place(self, partial: Path, sha256: str) -> None:
        final = self.path(sha256)
        if final.exists():  # the same bytes are kept once
            return
        fresh = not final.parent.exists()
        final.parent.mkdir(exist_ok=True, mode=0o700)
        os.replace(partial, final)
        _fsync_dir(final.parent)
        if fresh:  # the new directory's own entry, too
            _fsync_dir(self.root)

    async def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    async def get(self, sha256: str) -> AsyncIterator[bytes]:
        try:
            stored = open(self.path(sha256), "rb", buffering=0)  # noqa: SIM115 - closed below, as it is read
        except FileNotFoundError:
            raise NotStored(sha256) from None
        with stored:
            while chunk := await asyncio.to_thread(stored.read, CHUNK_BYTES):
                yield chunk
