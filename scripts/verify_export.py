#!/usr/bin/env python3
"""Check a Mission Control export on your own, with nothing but Python's standard library.

    python3 verify_export.py log.ndjson [POSITION:HASH]

An export (`mission-control export`, or GET /events with Accept: application/x-ndjson)
holds one recorded event per line, oldest first. It is intact when:

  1. positions run 1, 2, 3, ... with no gap;
  2. within each stream, versions run 1, 2, 3, ...;
  3. every hash is sha256(previous hash + the event without its hash, in RFC 8785 (JCS)
     form), the "previous hash" of position 1 being 64 zeros.

A digest POSITION:HASH saved earlier (GET /audit/digest) adds a fourth rule: the event at
POSITION still carries HASH, so nothing up to it changed since the digest was taken.

Exit status: 0 intact, 1 broken (the first bad position is printed), 2 wrong usage.
"""

import hashlib
import json
import sys


GENESIS_HASH = "0" * 64  # the "previous hash" of position 1


def sort_utf16(value):
    """RFC 8785 orders object keys by their UTF-16 code units, not by code points: the two
    differ when a key holds a character outside the BMP (an emoji) beside one in U+E000-U+FFFF."""
    if isinstance(value, dict):
        return {key: sort_utf16(value[key]) for key in sorted(value, key=lambda key: key.encode("utf-16-be"))}
    if isinstance(value, list):
        return [sort_utf16(item) for item in value]
    return value


def canonical(event):
    # RFC 8785 (JCS) for the values events hold: keys in UTF-16 order, no spaces, UTF-8 as is.
    return json.dumps(sort_utf16(event), separators=(",", ":"), ensure_ascii=False).encode()


def code_point_ordered(event):
    # The form Mission Control hashed before it followed RFC 8785: keys in code-point order.
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def verify(path, digest=None):
    """Returns (True, summary) or (False, what broke and where)."""
    previous_hash = GENESIS_HASH
    versions = {}  # stream -> last version seen
    position = 0  # the last good position
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            expected = position + 1
            try:
                event = json.loads(line)
                stored_hash = event.pop("hash")
                stream, version = event["stream"], event["version"]
                last_version = versions.get(stream, 0)
            except (ValueError, KeyError, TypeError, AttributeError):
                return False, f"broken at position {expected}: line {number} is not a recorded event"
            if event.get("position") != expected:
                return False, f"broken at position {expected}: line {number} holds position {event.get('position')}"
            if version != last_version + 1:
                return False, f"broken at position {expected}: stream {stream} jumps to version {version}"
            versions[stream] = version
            computed = hashlib.sha256(bytes.fromhex(previous_hash) + canonical(event)).hexdigest()
            if computed != stored_hash:
                old = hashlib.sha256(bytes.fromhex(previous_hash) + code_point_ordered(event)).hexdigest()
                if old == stored_hash:
                    return False, (f"broken at position {expected}: hashed with code-point key order (the pre-RFC "
                                   "8785 canonical form), not tampered with; `mission-control import --rechain` "
                                   "carries such a log forward")
                return False, f"broken at position {expected}: the hash does not match the event and its predecessor"
            if digest and expected == digest[0] and stored_hash != digest[1]:
                return False, f"broken at position {expected}: it no longer carries the digest's hash"
            previous_hash, position = stored_hash, expected
    if digest and digest[0] > position:
        return False, f"broken: the digest's position {digest[0]} lies beyond the last event, {position}"
    return True, f"ok: {position} events, last hash {previous_hash}"


def main(argv):
    if len(argv) not in (2, 3):
        print("usage: python3 verify_export.py EXPORT.ndjson [POSITION:HASH]", file=sys.stderr)
        return 2
    digest = None
    if len(argv) == 3:
        position, _, hash_ = argv[2].partition(":")
        if not position.isdigit() or len(hash_) != 64:
            print("the digest must be POSITION:HASH, e.g. 1234:9f86d081...", file=sys.stderr)
            return 2
        digest = (int(position), hash_.lower())
    try:
        ok, message = verify(argv[1], digest)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"cannot read {argv[1]}: {exc}", file=sys.stderr)
        return 2
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
