"""Group commit, shared by the backends whose writes go through one writer thread
(events/sqlite.py, events/postgres.py). No SQL here.

Appends wait in a queue; the writer commits whatever is waiting as one transaction, so one
commit (one fsync) serves many appends. Each append still checks its own expected version
against the stream as the transaction sees it, so a conflict fails that append alone, and a
projector refusing one append of a batch fails that append alone. A backend's `_commit`
opens the transaction, reads the chain's tail in it and hands it to `_staged`, which numbers,
versions and chains the batch's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import msgspec

from events.envelope import Meta, RecordedEvent, encode_payload, link_hash, now_rfc3339
from events.log import EventLog, IdempotencyConflict, LogClosed, Projector, WrongExpectedVersion
from events.types import EventData

COLUMNS = "position, stream, version, type, payload, meta, recorded_at, hash"
"""The events table's columns, in the order `row_event` reads them: every backend's."""
_canonical = msgspec.json.Encoder(order="sorted")
_type_json = functools.lru_cache(maxsize=None)(_canonical.encode)


class _Append:
    __slots__ = ("stream", "payloads", "expected", "meta", "key", "fingerprint", "future")

    def __init__(self, stream, payloads, expected, meta, key, fingerprint, future):
        self.stream = stream
        self.payloads: list[tuple[str, bytes, int]] = payloads  # (type, payload, schema)
        self.expected: int | None = expected
        self.meta: Meta = meta
        self.key: str | None = key
        self.fingerprint: str | None = fingerprint
        self.future: asyncio.Future = future


class _Outcome:
    """What became of one append of a batch: the events it recorded (`fresh`: written by this
    batch; otherwise an idempotent replay of an earlier append's), or the error refusing it."""

    __slots__ = ("events", "fresh", "error")

    def __init__(self, events: list[RecordedEvent], fresh: bool = True, error: BaseException | None = None):
        self.events, self.fresh, self.error = events, fresh, error

    @classmethod
    def failed(cls, error: BaseException) -> _Outcome:
        return cls([], False, error)


class _Staged(NamedTuple):
    """A batch made ready to write: an outcome per append, and the rows that record them."""

    outcomes: list[_Outcome]
    rows: list[tuple]
    keys: list[tuple]
    """Rows of the idempotency table."""
    versions: dict[str, int]
    """Each stream's version once the rows are written."""
    head: int
    hash: str
    """The chain's last hash once the rows are written."""

    def fresh(self) -> list[RecordedEvent]:
        return [e for outcome in self.outcomes if outcome.fresh for e in outcome.events]


class _ProjectorFailed(Exception):
    pass


def row_event(row: Sequence) -> RecordedEvent:
    """An event from a row of COLUMNS."""
    return RecordedEvent(
        position=row[0], stream=row[1], version=row[2], type=row[3],
        payload=msgspec.Raw(bytes(row[4])), meta=msgspec.Raw(bytes(row[5])), recorded_at=row[6], hash=row[7],
    )


class GroupCommitLog(EventLog):
    version_cache_size = 100_000
    """Streams whose version the writer remembers between batches."""

    def __init__(self, *, projector: Projector | None, max_batch: int):
        super().__init__()
        self.projector = projector
        self.max_batch = max_batch
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mc-log-writer")
        self._versions: dict[str, int] = {}  # writer thread only
        self._versions_at = -1
        self._pending: list[_Append] = []
        self._wakeup = asyncio.Event()
        self._closed = False

    @staticmethod
    @abstractmethod
    def _storage_error(error: BaseException) -> BaseException:
        """The driver's errors as StorageError; any other as it is."""

    @abstractmethod
    def _commit(self, batch: list[_Append]) -> list[_Outcome]:
        """On the writer thread: one transaction recording the batch (`_staged`), with the
        projector run in it; raises _ProjectorFailed if the projector refuses a batch of several."""

    # --- appends -----------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Sequence[EventData],
        *,
        expected: int | None = None,
        meta: Meta | None = None,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> list[RecordedEvent]:
        if self._closed:
            raise LogClosed("the log is closed")
        payloads = [(e.event_type, encode_payload(e), e.schema) for e in events]
        if idempotency_key is not None and fingerprint is None:
            digest = hashlib.sha256(stream.encode())
            for event_type, payload, _ in payloads:
                digest.update(b"\0" + event_type.encode() + b"\0" + payload)
            fingerprint = digest.hexdigest()
        future = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Append(stream, payloads, expected, meta or Meta(), idempotency_key, fingerprint, future)
        )
        self._wakeup.set()
        return await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                started = time.perf_counter()
                try:
                    outcomes = await loop.run_in_executor(self._writer_thread, self._commit_batch, batch)
                except Exception as exc:  # the database itself failed: every append in it fails
                    outcomes = [_Outcome.failed(exc)] * len(batch)
                if self.on_batch is not None:
                    with contextlib.suppress(Exception):  # an observer must never stop the writer
                        self.on_batch(len(batch), time.perf_counter() - started)
                committed: list[RecordedEvent] = []
                for append, outcome in zip(batch, outcomes):
                    if outcome.error is None:
                        if outcome.fresh:
                            committed.extend(outcome.events)
                        if not append.future.done():
                            append.future.set_result(outcome.events)
                    elif not append.future.done():
                        append.future.set_exception(self._storage_error(outcome.error))
                self._committed(committed)
            if self._closed:
                return

    def _commit_batch(self, batch: list[_Append]) -> list[_Outcome]:
        """Runs on the writer thread. Returns an outcome per append."""
        try:
            return self._commit(batch)
        except _ProjectorFailed:
            # Find the append the projector refuses; the others still commit, each on its own.
            outcomes: list[_Outcome] = []
            for append in batch:
                try:
                    outcomes.append(self._commit([append])[0])
                except Exception as exc:  # this one alone failed; those before it are committed
                    outcomes.append(_Outcome.failed(exc))
            return outcomes

    def _staged(
        self,
        batch: list[_Append],
        position: int,
        previous: str,
        stream_versions: Callable[[list[str]], dict[str, int]],
        recorded_for_key: Callable[[str], tuple[str, list[RecordedEvent]] | None],
    ) -> _Staged:
        """The batch numbered from the chain's tail (`position`, `previous` hash) as the
        transaction sees it; `stream_versions` (the versions of streams that have events, asked once
        for every stream of the batch this process does not know) and `recorded_for_key` ask that
        transaction."""
        if position != self._versions_at:  # another process appended: what we knew may be stale
            self._versions.clear()
        unknown = list({append.stream for append in batch if append.stream not in self._versions})
        stored = stream_versions(unknown) if unknown else {}
        versions: dict[str, int] = {}  # this batch's, merged into self._versions once committed
        recorded_at = now_rfc3339()  # one group commit, one instant
        recorded_at_json = _canonical.encode(recorded_at)
        used_keys: dict[str, tuple[str, list[RecordedEvent]]] = {}
        outcomes: list[_Outcome] = []
        rows: list[tuple] = []
        keys: list[tuple] = []
        for append in batch:
            if append.key is not None:
                earlier = used_keys.get(append.key) or recorded_for_key(append.key)
                if earlier is not None:
                    fingerprint, recorded = earlier
                    if fingerprint == append.fingerprint:
                        outcomes.append(_Outcome(recorded, fresh=False))
                    else:
                        outcomes.append(_Outcome.failed(IdempotencyConflict(append.key)))
                    continue
            version = versions.get(append.stream)
            if version is None:
                version = self._versions.get(append.stream)
            if version is None:
                version = stored.get(append.stream, 0)
            if append.expected is not None and append.expected != version:
                outcomes.append(_Outcome.failed(WrongExpectedVersion(append.stream, append.expected, version)))
                continue
            recorded = []
            stream_json = _canonical.encode(append.stream)
            for event_type, payload, schema in append.payloads:
                position += 1
                version += 1
                meta = _canonical.encode(msgspec.structs.replace(append.meta, schema=schema))
                previous = link_hash(
                    previous, meta, payload, position, recorded_at_json, stream_json, _type_json(event_type), version
                )
                rows.append((position, append.stream, version, event_type, payload, meta, recorded_at, previous))
                recorded.append(RecordedEvent(
                    position=position, stream=append.stream, version=version, type=event_type,
                    payload=msgspec.Raw(payload), meta=msgspec.Raw(meta), recorded_at=recorded_at, hash=previous,
                ))
            versions[append.stream] = version
            if append.key is not None and recorded:
                used_keys[append.key] = (append.fingerprint, recorded)
                keys.append((append.key, append.fingerprint, recorded[0].position, recorded[-1].position))
            outcomes.append(_Outcome(recorded))
        return _Staged(outcomes, rows, keys, versions, position, previous)

    def _remember(self, versions: dict[str, int], head: int) -> None:
        """Stream versions as of `head`, so the next batch need not ask the database for them.
        They are trusted only while the head is still ours: (stream, version) is UNIQUE anyway."""
        if len(self._versions) + len(versions) > self.version_cache_size:
            self._versions.clear()
        self._versions.update(versions)
        self._versions_at = head
