"""The append-only log: its interface, its errors, and the live tail every backend shares.

A backend implements the storage methods (`append`, `read_all`, `read_stream`,
`last_event`, `idempotent`, `import_recorded`, ...) in a module named after it (events/sqlite.py),
which holds all of its SQL and translates its driver's errors into StorageError. The tail is
written once here, on top of `read_all` and the backend's commit notifications, so every
backend resumes alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import ClassVar, NamedTuple, Protocol

from events.envelope import Meta, RecordedEvent
from events.types import EventData

ANY: None = None
"""Expected version: append whatever the stream's version is."""
NO_STREAM = 0
"""Expected version: the stream must not exist yet."""


class WrongExpectedVersion(Exception):
    def __init__(self, stream: str, expected: int, actual: int):
        self.stream, self.expected, self.actual = stream, expected, actual
        super().__init__(f"stream {stream!r} is at version {actual}, not {expected}")


class IdempotencyConflict(Exception):
    def __init__(self, key: str):
        self.key = key
        super().__init__(f"idempotency key {key!r} was already used for a different append")


class LogClosed(Exception):
    """The log is closing; nothing more is accepted."""


class StorageError(Exception):
    """The storage under the log failed or is not a log (a file that is not a database, a disk
    error): every backend raises its driver's errors as this, the original as its cause."""


class Transaction(Protocol):
    """A backend's write transaction, as a projector sees it inside an append. Beyond reading
    the log it is the backend's own handle: the read models of the same backend (a module
    beside the log's, named alike) write through it, so they commit or fail with the append."""

    def read_events(self, after: int, until: int, limit: int) -> list[RecordedEvent]:
        """Committed events in (after, until], as this transaction sees them."""
        ...


Projector = Callable[[Transaction, list[RecordedEvent]], None]
"""Called inside every append transaction with the events it records, in order.
If it raises, the append fails and nothing of it is written."""


class Page(NamedTuple):
    events: list[RecordedEvent]
    next: int
    """The position to pass as `after` for the next page."""

    @classmethod
    def read(cls, events: list[RecordedEvent], after: int, until: int, limit: int) -> Page:
        """`events`, read after `after` up to `until` at most `limit` of them: a full page goes on
        from its last event, a short one has reached `until`."""
        return cls(events, events[-1].position if len(events) == limit else max(after, until))


class TypeFilter:
    """`types` as API.md defines it: exact names, or prefixes ending in `.` or `*`."""

    def __init__(self, types: Iterable[str]):
        self.exact: set[str] = set()
        self.prefixes: list[str] = []
        for t in types:
            if t.endswith("*"):
                self.prefixes.append(t[:-1])
            elif t.endswith("."):
                self.prefixes.append(t)
            else:
                self.exact.add(t)

    def __call__(self, event_type: str) -> bool:
        return event_type in self.exact or any(event_type.startswith(p) for p in self.prefixes)


def matcher(streams: Sequence[str] | None, types: TypeFilter | None) -> Callable[[RecordedEvent], bool]:
    stream_set = None if streams is None else set(streams)  # [] matches nothing
    return lambda e: (stream_set is None or e.stream in stream_set) and (types is None or types(e.type))


class EventLog(ABC):
    """One append-only log. Positions are global, gapless and start at 1."""

    backend: ClassVar[str]
    """The backend's name, which its modules are named after (events/sqlite.py, projections/sqlite.py)."""

    recent_capacity = 20_000
    """How many of the newest events the tail keeps at hand for live readers."""
    storage_retry_seconds = 0.5
    """How long a tail waits before reading storage again when it failed."""
    recent_bytes = 8 * 1024 * 1024
    """And at most about this many bytes of their payloads: a run printing megabytes of output
    must not pile up in memory (a reader that far behind reads from storage instead)."""

    def __init__(self) -> None:
        self._head = 0
        self._advanced = asyncio.Event()
        self._recent: list[RecordedEvent] = []  # contiguous positions ending at self._head
        self._recent_size = 0  # bytes of their payloads
        self.on_batch: Callable[[int, float], None] | None = None
        """Optional observer of each commit a backend makes: (appends in it, seconds it took)."""
        self.projector: Projector | None = None
        """Run inside every append's transaction (the read models kept beside the log)."""
        self._exclusives: dict[str, asyncio.Lock] = {}

    # --- storage, per backend -------------------------------------------------

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def append(
        self,
        stream: str,
        events: Sequence[EventData],
        *,
        expected: int | None = ANY,
        meta: Meta | None = None,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> list[RecordedEvent]:
        """Append atomically, durably; returns the recorded events.

        With an `idempotency_key` already used with the same fingerprint (by default, a
        digest of the stream and events), returns the events recorded then and writes
        nothing; with another fingerprint raises IdempotencyConflict.
        """

    @abstractmethod
    async def read_all(
        self,
        after: int = 0,
        limit: int = 500,
        *,
        streams: Sequence[str] | None = None,
        types: TypeFilter | None = None,
        until: int | None = None,
    ) -> Page:
        """Events with position in (after, until], oldest first, at most `limit`."""

    @abstractmethod
    async def read_stream(
        self, stream: str, after_version: int = 0, *, types: TypeFilter | None = None,
        until_position: int | None = None, limit: int | None = None,
    ) -> list[RecordedEvent]:
        """The stream's events after `after_version`, oldest first."""

    @abstractmethod
    async def last_event(self, stream: str) -> RecordedEvent | None:
        """The stream's newest event, if it has any."""

    @abstractmethod
    async def read_head(self) -> int:
        """The head as stored, which another process may have moved."""

    @abstractmethod
    async def idempotent(self, key: str) -> tuple[str, list[RecordedEvent]] | None:
        """The fingerprint and events of an append made with this key, if any."""

    @abstractmethod
    async def import_recorded(self, events: Iterable[RecordedEvent]) -> int:
        """Append events another log recorded (an export), keeping each exactly as recorded:
        position, version, recordedAt, meta and hash. Every event must extend the chain from
        this log's head (events.verify.Chain); at the first that does not, ChainBroken is
        raised and nothing of the import is written. The projector runs as for appends.
        `events` is consumed on the backend's writer, so it may lazily read a file; anything
        it raises aborts the import as well. Returns the new head."""

    @abstractmethod
    async def _acquire(self, name: str) -> None:
        """Wait until this process holds the lock `name` that every process on this storage shares."""

    @abstractmethod
    async def _release(self, name: str) -> None:
        """Give the lock `name` back (it is held)."""

    # --- one holder at a time, whichever process ---------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """Held by one holder at a time among all the processes on this log, for a decision that
        must see the events of every one decided before it (admitting a run under the concurrency
        limit). A process's own holders queue in memory first, so it waits on the backend's lock
        once at a time."""
        local = self._exclusives.setdefault(name, asyncio.Lock())
        async with local:
            acquiring = asyncio.ensure_future(self._acquire(name))
            try:
                await asyncio.shield(acquiring)
            except asyncio.CancelledError:
                # Cancelled while waiting: the lock may be granted all the same, and must go back.
                with contextlib.suppress(Exception):
                    await acquiring
                    await self._release(name)
                raise
            try:
                yield
            finally:
                await self._release(name)

    # --- the live tail, shared by every backend -------------------------------

    @property
    def head(self) -> int:
        """The last position this process knows to be committed."""
        return self._head

    def _committed(self, events: list[RecordedEvent]) -> None:
        """Called by the backend, in position order, once events are durable. They may overlap
        what this process knows (the writer and the watcher racing) or have gaps (another
        process appended in between); the cache only ever holds contiguous positions."""
        fresh = [e for e in events if e.position > self._head]
        if not fresh:
            return
        if fresh[0].position == self._head + 1 and fresh[-1].position - fresh[0].position == len(fresh) - 1:
            self._recent.extend(fresh)
            self._recent_size += sum(len(e.payload) for e in fresh)
            if len(self._recent) > 2 * self.recent_capacity or self._recent_size > 2 * self.recent_bytes:
                self._trim_recent()  # amortised: at most once per capacity's worth of appends
        else:  # positions this process has not seen lie in between: tails read those from storage
            self._recent, self._recent_size = [], 0
        self._head = fresh[-1].position
        self._wake()

    def _trim_recent(self) -> None:
        drop = max(0, len(self._recent) - self.recent_capacity)
        size = self._recent_size - sum(len(e.payload) for e in self._recent[:drop])
        while size > self.recent_bytes and drop < len(self._recent) - 1:
            size -= len(self._recent[drop].payload)
            drop += 1
        del self._recent[:drop]
        self._recent_size = size

    def _wake(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

    def _recent_after(self, position: int, limit: int) -> list[RecordedEvent] | None:
        recent = self._recent
        if not recent or position + 1 < recent[0].position:
            return None
        start = position + 1 - recent[0].position
        return recent[start : start + limit]

    async def tail(
        self,
        after: int = 0,
        *,
        streams: Sequence[str] | None = None,
        types: TypeFilter | None = None,
        page: int = 500,
    ) -> AsyncIterator[RecordedEvent]:
        """Every matching event after `after`, history then live, each exactly once, in order.

        It reads only committed events by position, so the seam between history and live
        cannot gap or repeat.
        """
        async with contextlib.aclosing(self.tail_pages(after, streams=streams, types=types, page=page)) as pages:
            async for events in pages:
                for event in events:
                    yield event

    async def tail_pages(
        self,
        after: int = 0,
        *,
        streams: Sequence[str] | None = None,
        types: TypeFilter | None = None,
        page: int = 500,
    ) -> AsyncIterator[list[RecordedEvent]]:
        """`tail` a page at a time: each list is non-empty and holds the matching events among
        at most `page` positions, so a reader can write a page at once and is never handed
        more than a page however far behind it is."""
        match = matcher(streams, types)
        filtered = streams is not None or types is not None
        position = after
        while True:
            advanced = self._advanced  # taken before reading the head: no missed wake-up
            head = self._head
            if position < head:
                recent = self._recent_after(position, page)
                if recent is None:
                    try:
                        got = await self.read_all(position, page, streams=streams, types=types, until=head)
                    except StorageError:  # the storage away for a moment: the tail waits, never ends
                        await asyncio.sleep(self.storage_retry_seconds)
                        continue
                    events = got.events
                    position = got.next
                else:
                    events = [e for e in recent if match(e)] if filtered else recent
                    position = recent[-1].position
                if events:
                    yield events
                continue
            await advanced.wait()
