"""The hash chain's rules: what `GET /audit/verify`, `mission-control verify` and import check."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from events.envelope import GENESIS_HASH, RecordedEvent, canonical_json, chain_hash
from events.log import EventLog


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
        version_of: Callable[[str], int] = lambda stream: 0,
    ):
        self.position, self.previous = position, previous
        self._version_of = version_of  # a stream's version before the first event checked here
        self._versions: dict[str, int] = {}

    def extend(self, event: RecordedEvent) -> None:
        expected = self.position + 1
        if event.position != expected:
            raise ChainBroken(expected, f"found position {event.position} where {expected} belongs")
        version = self._versions.get(event.stream)
        if version is None:
            version = self._version_of(event.stream)
        if event.version != version + 1:
            raise ChainBroken(expected, f"stream {event.stream} goes from version {version} to {event.version}")
        if chain_hash(self.previous, event) != event.hash:
            raise ChainBroken(expected, "the hash does not match the event and its predecessor")
        # The hash covers the stored bytes; API.md's rule re-serialises the served JSON. They
        # agree only while payload and meta are stored in canonical form, so that is a rule too.
        for part in (event.payload, event.meta):
            raw = bytes(part)
            if canonical_json(msgspec.json.decode(raw)) != raw:
                raise ChainBroken(expected, "its payload or meta is not in canonical JSON form")
        self._versions[event.stream] = event.version
        self.position, self.previous = expected, event.hash


class ChainReport(msgspec.Struct, kw_only=True, rename="camel"):
    ok: bool
    head: int
    checked: int
    first_bad_position: int | None = None
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
    return ChainReport(ok=True, head=head, checked=chain.position)
