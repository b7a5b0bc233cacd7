"""Walking the hash chain: what `GET /audit/verify` and `mission-control verify` report."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from events.envelope import GENESIS_HASH, chain_hash
from events.log import EventLog


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
    """Check positions are 1..head without gaps, versions count up per stream, and every hash.

    With `against=(position, hash)`, a digest saved earlier, also prove the log still
    extends it: the event at that position must carry that hash.
    """
    head = await log.read_head()
    previous, expected_position, checked = GENESIS_HASH, 1, 0
    versions: dict[str, int] = {}
    after = 0

    def bad(position: int, reason: str) -> ChainReport:
        return ChainReport(ok=False, head=head, checked=checked, first_bad_position=position, reason=reason)

    while after < head:
        got = await log.read_all(after, page, until=head)
        for event in got.events:
            if event.position != expected_position:
                return bad(expected_position, f"position {expected_position} is missing")
            if event.version != versions.get(event.stream, 0) + 1:
                return bad(event.position, f"stream {event.stream} jumps to version {event.version}")
            versions[event.stream] = event.version
            computed = chain_hash(previous, event)
            if computed != event.hash:
                return bad(event.position, "the hash does not match the event and its predecessor")
            if against is not None and event.position == against[0] and event.hash != against[1]:
                return bad(event.position, "the log no longer extends the digest")
            previous, expected_position, checked = computed, expected_position + 1, checked + 1
        after = got.next
        if progress is not None:
            progress(after, head)
    if against is not None and against[0] > head:
        return bad(head + 1, f"the digest's position {against[0]} lies beyond the head {head}")
    return ChainReport(ok=True, head=head, checked=checked)
