"""The hash chain checked the way an auditor does: standard library only.

It hashes the recorded event as the API serves it (msgspec's JSON of RecordedEvent) with the
canonical form of scripts/verify_export.py, the auditor's own script, so a mismatch between
what is stored, what is served and what is hashed shows up here.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import msgspec

from events import GENESIS_HASH, RecordedEvent

VERIFY_EXPORT = Path(__file__).parent.parent / "scripts" / "verify_export.py"
_spec = importlib.util.spec_from_file_location("verify_export", VERIFY_EXPORT)
verify_export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verify_export)
canonical = verify_export.canonical


def served(event: RecordedEvent) -> dict:
    return msgspec.json.decode(msgspec.json.encode(event))


def audit(events: Iterable[RecordedEvent]) -> int:
    """Checks every hash from the genesis and that positions run 1, 2, 3...; returns the count."""
    previous, checked = GENESIS_HASH, 0
    for event in events:
        obj = served(event)
        stored = obj.pop("hash")
        previous = hashlib.sha256(bytes.fromhex(previous) + canonical(obj)).hexdigest()
        assert stored == previous, f"hash mismatch at position {event.position}"
        checked += 1
        assert event.position == checked, f"expected position {checked}, found {event.position}"
    return checked
