"""The hash chain checked the way API.md tells an auditor to: standard library only.

It hashes the recorded event as the API serves it (msgspec's JSON of RecordedEvent), so a
mismatch between what is stored, what is served and what is hashed shows up here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import msgspec

from events import RecordedEvent


def served(event: RecordedEvent) -> dict:
    return msgspec.json.decode(msgspec.json.encode(event))


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def audit(events: Iterable[RecordedEvent]) -> int:
    """Checks every hash from the genesis and that positions run 1, 2, 3...; returns the count."""
    previous, checked = "0" * 64, 0
    for event in events:
        obj = served(event)
        stored = obj.pop("hash")
        previous = hashlib.sha256(bytes.fromhex(previous) + canonical(obj)).hexdigest()
        assert stored == previous, f"hash mismatch at position {event.position}"
        checked += 1
        assert event.position == checked, f"expected position {checked}, found {event.position}"
    return checked
