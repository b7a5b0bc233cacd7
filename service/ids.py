"""Ids the service mints: random (version 4) UUIDs, written as the API writes every id."""

from __future__ import annotations

import os


def new_id() -> str:
    """What `str(uuid.uuid4())` gives, without a UUID object checked and built on the way: a
    request mints two (its request id, its task's id), and that cost as much as the rest of
    its id handling together."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
