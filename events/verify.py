"""The hash chain's rules: what `GET /audit/verify`, `mission-control verify` and import check."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator

import msgspec

from events.envelope import (
    GENESIS_HASH, Meta, RecordedEvent, canonical_json, chain_hash, code_point_json, encode_payload, now_rfc3339,
)
from events.log import EventLog
from events.types import LogRechained

CODE_POINT_ORDER = (
    "hashed with code-point key order (the pre-RFC 8785 canonical form), not tampered with: "
    "`mission-control import --rechain` carries such a log forward"
)


class ChainBroken(Exception):
    """An event that does not extend the chain: its position, and why."""

    def __init__(self, position: int, reason: str):
        self.position, self.reason = position, reason
        super().__init__(f"broken at position {position}: {reason}")


class Chain:
    """The chain checked one event at a time, oldest first: positions run on without gaps,
    each stream's versions count up by one, and each hash covers the event and the hash
    before it. `extend` raises ChainBroken at the first event that breaks a rule."""

    def __init__(
        self, position: int = 0, previous: str = GENESIS_HASH,
        version_of: Callable[[str], int] = lambda stream: 0, *, code_point_order: bool = False,
    ):
        self.position, self.previous = position, previous
        self._version_of = version_of  # a stream's version before the first event checked here
        self._versions: dict[str, int] = {}
        self._code_point_order = code_point_order  # also take the pre-RFC 8785 form (a rechain's source)

    def version(self, stream: str) -> int:
        """The stream's version as of the last event checked."""
        version = self._versions.get(stream)
        return self._version_of(stream) if version is None else version

    def extend(self, event: RecordedEvent) -> None:
        expected = self.position + 1
        if event.position != expected:
            raise ChainBroken(expected, f"found position {event.position} where {expected} belongs")
        version = self.version(event.stream)
        if event.version != version + 1:
            raise ChainBroken(expected, f"stream {event.stream} goes from version {version} to {event.version}")
        if chain_hash(self.previous, event) != event.hash:
            raise ChainBroken(expected, "the hash does not match the event and its predecessor")
        # The hash covers the stored bytes; API.md's rule re-serialises the served JSON. They
        # agree only while payload and meta are stored in canonical form, so that is a rule too.
        for part in (event.payload, event.meta):
            raw = bytes(part)
            value = msgspec.json.decode(raw)
            if canonical_json(value) != raw:
                if code_point_json(value) != raw:
                    raise ChainBroken(expected, "its payload or meta is not in canonical JSON form")
                if not self._code_point_order:
                    raise ChainBroken(expected, CODE_POINT_ORDER)
        self._versions[event.stream] = event.version
        self.position, self.previous = expected, event.hash


class ChainReport(msgspec.Struct, kw_only=True, rename="camel"):
    """What a check of the chain found: the answer of `GET /audit/verify` as well."""

    ok: bool
    head: int
    checked: int
    first_bad_position: int | None
    reason: str | None = None


async def verify_chain(
    log: EventLog,
    *,
    against: tuple[int, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    page: int = 5000,
) -> ChainReport:
    """Check every event from the first to the head by the Chain's rules.

    With `against=(position, hash)`, a digest saved earlier, also prove the log still
    extends it: the event at that position must carry that hash.
    """
    head = await log.read_head()
    chain = Chain()
    # The next page is read (on the backend's thread) while this one is hashed.
    reading = asyncio.ensure_future(log.read_all(0, page, until=head)) if head else None
    try:
        while reading is not None:
            got = await reading
            reading = asyncio.ensure_future(log.read_all(got.next, page, until=head)) if got.next < head else None
            for event in got.events:
                chain.extend(event)
                if against is not None and event.position == against[0] and event.hash != against[1]:
                    raise ChainBroken(event.position, "the log no longer extends the digest")
            if progress is not None:
                progress(got.next, head)
        if against is not None and against[0] > head:
            raise ChainBroken(head + 1, f"the digest's position {against[0]} lies beyond the head {head}")
    except ChainBroken as broken:
        return ChainReport(
            ok=False, head=head, checked=chain.position, first_bad_position=broken.position, reason=broken.reason,
        )
    finally:
        if reading is not None:
            reading.cancel()
    return ChainReport(ok=True, head=head, checked=chain.position, first_bad_position=None)


class Rechain:
    """Carries a log hashed before it followed RFC 8785 forward (`import --rechain`).

    Every event is checked by the rules it was written under (payload and meta in RFC 8785
    form or in code-point key order), re-encoded in RFC 8785 form and hashed anew from the
    first event that changed on; position, stream, version, type and recordedAt stay. The
    last event `carry` yields records the old head, `log.rechained`, unless no byte changed.
    """

    STREAM = "log"

    def __init__(self) -> None:
        self.old = Chain(code_point_order=True)
        self.previous = GENESIS_HASH  # the new chain's head hash
        self.first_changed: int | None = None
        self.changed = 0

    def carry(self, events: Iterable[RecordedEvent], actor: str) -> Iterator[RecordedEvent]:
        for event in events:
            self.old.extend(event)
            payload, meta = (canonical_json(msgspec.json.decode(part)) for part in (event.payload, event.meta))
            if payload != bytes(event.payload) or meta != bytes(event.meta):
                self.changed += 1
                self.first_changed = self.first_changed or event.position
                event = msgspec.structs.replace(event, payload=msgspec.Raw(payload), meta=msgspec.Raw(meta))
            if self.first_changed is not None:
                event = msgspec.structs.replace(event, hash=chain_hash(self.previous, event))
            self.previous = event.hash
            yield event
        if self.first_changed is not None:
            yield self._provenance(actor)

    def _provenance(self, actor: str) -> RecordedEvent:
        data = LogRechained(
            previous_head=self.old.position, previous_hash=self.old.previous,
            first_changed=self.first_changed, changed=self.changed,
        )
        event = RecordedEvent(
            position=self.old.position + 1, stream=self.STREAM, version=self.old.version(self.STREAM) + 1,
            type=data.event_type, payload=msgspec.Raw(encode_payload(data)),
            meta=msgspec.Raw(canonical_json(Meta(actor=actor, schema=data.schema))),
            recorded_at=now_rfc3339(), hash="",
        )
        self.previous = chain_hash(self.previous, event)
        return msgspec.structs.replace(event, hash=self.previous)
