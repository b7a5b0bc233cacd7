"""Ids the service mints: random (version 4) UUIDs, written as the API writes every id."""

from __future__ import annotations

import os
import threading

_READ = 4096
"""Random bytes read from the OS at a time: 256 ids. Each read releases the GIL, and on a busy
server the log's writer thread takes it then, so one read per id kept a request waiting."""


class _RandomBytes:
    """The OS's CSPRNG, read ahead. A forked child starts afresh: it must never mint its
    parent's ids."""

    def __init__(self):
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()  # anew: another thread may have held it at the fork
        self._bytes = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            at = self._at
            if at + n > len(self._bytes):
                self._bytes, at = os.urandom(max(_READ, n)), 0
            self._at = at + n
            return self._bytes[at:at + n]


_random = _RandomBytes()


def new_id() -> str:
    """What `str(uuid.uuid4())` gives, without a UUID object checked and built on the way: a
    request mints two (its request id, its task's id), and that cost as much as the rest of
    its id handling together."""
    raw = bytearray(_random.take(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
