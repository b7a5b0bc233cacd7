"""Artifact bytes, content-addressed by SHA-256, beside the log: the interface every backend keeps.

A backend (service/artifacts/<backend>.py, named after the log's) stores what `put` is given
durably before `put` returns, so an event naming the hash may be appended after it: the data
dir's files on SQLite, the log's own database on PostgreSQL (every node serves every artifact).
Which artifacts exist, and what they are called, is the log's business (`artifact.*` events);
the store knows bytes by their hash only, and the same bytes are kept once.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import NamedTuple

from events import EventLog, TypeFilter, decode
from events.types import Sha256

CHUNK_BYTES = 1024 * 1024
"""How many bytes a backend writes, and `get` yields, at a time."""
SHA256 = re.compile(Sha256.__metadata__[0].pattern)  # the events' rule for a hash, not a copy of it
MAX_NAME = 255
MEDIA_TYPE = re.compile(
    r"^[A-Za-z0-9!#$&^_.+-]{1,127}/[A-Za-z0-9!#$&^_.+-]{1,127}"
    r"(\s*;\s*[A-Za-z0-9!#$&^_.+-]+=([A-Za-z0-9!#$&^_.+-]+|\"[^\"\\\x00-\x1f\x7f]*\"))*$"
)
DEFAULT_TYPE = "application/octet-stream"


class Stored(NamedTuple):
    sha256: str
    size: int


class TooLarge(Exception):
    """The bytes went past the limit; nothing was kept."""

    def __init__(self, limit: int):
        super().__init__(f"The artifact is larger than the limit of {limit} bytes.")
        self.limit = limit


class Empty(Exception):
    """No bytes at all; nothing was kept."""


class Full(Exception):
    """The storage has no room (ENOSPC, a full database disk); nothing was kept."""


class NotStored(Exception):
    """No bytes are stored under this hash."""


class Hashing:
    """Counts and hashes bytes as they pass, refusing past `limit`."""

    def __init__(self, limit: int):
        self.limit, self.size, self.digest = limit, 0, hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise TooLarge(self.limit)
        self.digest.update(chunk)

    def stored(self) -> Stored:
        if self.size == 0:
            raise Empty()
        return Stored(self.digest.hexdigest(), self.size)


async def rechunked(chunks: AsyncIterable[bytes], size: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
    """The bytes of `chunks` in pieces of `size` (the last one shorter)."""
    pending = bytearray()
    async for chunk in chunks:
        pending += chunk
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)


class ArtifactStore(ABC):
    @abstractmethod
    async def prepare(self) -> None:
        """Create what the store keeps its bytes in, if missing."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def put(self, chunks: AsyncIterable[bytes], limit: int) -> Stored:
        """Store the bytes, hashing them as they arrive and never holding them all; durable once it
        returns. TooLarge as soon as they pass `limit`, Empty for none, Full when out of room:
        then nothing of them is kept."""

    @abstractmethod
    async def has(self, sha256: str) -> bool: ...

    @abstractmethod
    def get(self, sha256: str) -> AsyncIterator[bytes]:
        """The bytes, a chunk at a time; NotStored (on the first iteration) if there are none."""


def open_store(log: EventLog) -> ArtifactStore:
    """The artifact store of `log`'s backend, beside it. `prepare` it before use."""
    return importlib.import_module(f"service.artifacts.{log.backend}").open_store(log)


async def digest(store: ArtifactStore, sha256: str) -> str:
    """The SHA-256 of what the store holds under `sha256` (NotStored if nothing): `verify`'s check."""
    found = hashlib.sha256()
    async for chunk in store.get(sha256):
        found.update(chunk)
    return found.hexdigest()


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an artifact (a sentence), or None: it is one path segment."""
    if not name:
        return "An artifact's name is empty."
    if len(name) > MAX_NAME:
        return f"An artifact's name is at most {MAX_NAME} characters; this one has {len(name)}."
    if name in (".", ".."):
        return f"{name!r} cannot name an artifact: a name is one path segment, a file's name."
    for char, said in (("/", "'/'"), ("\\", "'\\'"), ("\x00", "a NUL character")):
        if char in name:
            return f"An artifact's name is one path segment, without {said}: {name[:80]!r}."
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in name):
        return f"An artifact's name holds a control character: {name[:80]!r}."
    return None


class Recorded(NamedTuple):
    """Where the log first names an artifact's bytes, for a sentence about them."""

    task_id: str
    name: str


async def recorded(log: EventLog) -> dict[str, Recorded]:
    """Every SHA-256 the log's `artifact.*` events name, in the order first named."""
    found: dict[str, Recorded] = {}
    after, head = 0, await log.read_head()
    while after < head:
        page = await log.read_all(after, 5000, types=TypeFilter(["artifact."]), until=head)
        for event in page.events:
            data = decode(event)
            found.setdefault(data.sha256, Recorded(data.task_id, data.name))  # type: ignore[attr-defined]
        after = page.next
    return found


async def problems(store: ArtifactStore, named: dict[str, Recorded]) -> list[str]:
    """A sentence for each artifact whose bytes are missing from the store or are not what the log
    recorded: `verify`'s check of what the chain covers by hash only."""
    found = []
    for sha256, where in named.items():
        what = f"artifact {sha256} ({where.name!r} of task {where.task_id})"
        try:
            held = await digest(store, sha256)
        except NotStored:
            found.append(f"{what} is missing from the store")
            continue
        if held != sha256:
            found.append(f"{what} is altered: the stored bytes hash to {held}")
    return found


async def export_to(store: ArtifactStore, named: dict[str, Recorded], directory: Path) -> None:
    """Each artifact's bytes as `<directory>/<sha256>`, written aside and renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    for sha256 in named:
        partial = directory / f".{sha256}.part"
        with open(partial, "wb") as out:
            async for chunk in store.get(sha256):
                out.write(chunk)
        partial.replace(directory / sha256)


async def import_from(store: ArtifactStore, wanted: set[str], directory: Path) -> list[str]:
    """Store the bytes of every artifact in `wanted` from `<directory>/<sha256>`; a sentence for each
    missing or whose bytes do not hash to its name (that one is not stored)."""
    found = []
    for sha256 in sorted(wanted):
        source = directory / sha256
        if not source.is_file():
            found.append(f"artifact {sha256} is not in {directory}")
            continue
        stored = await store.put(file_chunks(source), 2**62)
        if stored.sha256 != sha256:
            found.append(f"{source} holds other bytes than its name says (they hash to {stored.sha256})")
    return found


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    """A file's bytes, a chunk at a time, read off the event loop: what `put` takes from a file."""
    with open(path, "rb") as source:
        while chunk := await asyncio.to_thread(source.read, CHUNK_BYTES):
            yield chunk
