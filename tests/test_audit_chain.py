"""The chain catches tampering with the log file at the exact position, and digests catch rewrites.

Each case edits the SQLite file under the running app as an attacker with file access
would (triggers dropped), asks `mission-control verify` and GET /audit/verify, and puts the
events back as they were.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from events import RecordedEvent, chain_hash
from tests.audit_sqlite import database, recorded, replace_events
from tests.audit_tools import rehashed, settled, standalone
from tests.inprocess import InProcess
from tests.server import cli

pytestmark = pytest.mark.sqlite_file

K, J = 6, 10  # the positions the cases tamper with


@pytest.fixture(scope="module")
def live(shared_app_server) -> InProcess:
    """A server with a few finished runs in its log, and nothing more going on."""
    client = shared_app_server.client()
    for n in range(4):
        task = client.post("/tasks", json={"type": "prompt", "title": f"t{n}", "content": f"say {n}"}).json()
        if n % 2:
            client.post(f"/tasks/{task['id']}/run").raise_for_status()
            settled(client, task["id"])
    assert len(recorded(database(shared_app_server.data_dir))) > J + 2
    return shared_app_server


def _modified(events: list[RecordedEvent]) -> list[RecordedEvent]:
    """Position K's payload rewritten, still canonical JSON, its hash left as it was."""
    event = events[K - 1]
    payload = json.loads(bytes(event.payload))
    payload[sorted(payload)[0]] = "forged"
    forged = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return [msgspec.structs.replace(event, payload=msgspec.Raw(forged)), *events[K:]]


def _removed(events: list[RecordedEvent]) -> list[RecordedEvent]:
    return events[K:]


def _swapped(events: list[RecordedEvent]) -> list[RecordedEvent]:
    """The contents of positions K and J exchanged, each keeping its position."""
    tail = list(events[K - 1:])
    a, b = tail[0], tail[J - K]
    tail[0] = msgspec.structs.replace(b, position=a.position)
    tail[J - K] = msgspec.structs.replace(a, position=b.position)
    return tail


def _inserted(events: list[RecordedEvent], well_hashed: bool) -> list[RecordedEvent]:
    """A forged event at K + 1, the later ones moved up by one."""
    forged = msgspec.structs.replace(events[K - 1], position=K + 1, stream="task-forged", version=1, hash="0" * 64)
    if well_hashed:
        forged = msgspec.structs.replace(forged, hash=chain_hash(events[K - 1].hash, forged))
    return [forged, *(msgspec.structs.replace(e, position=e.position + 1) for e in events[K:])]


CASES: dict[str, tuple[Callable[[list[RecordedEvent]], list[RecordedEvent]], int, int]] = {
    # name: (new events from the first changed position on, that position, the first bad position)
    "modified payload": (_modified, K, K),
    "removed event": (_removed, K, K),
    "reordered events": (_swapped, K, K),
    "inserted event": (lambda events: _inserted(events, False), K + 1, K + 1),
    # A forger who hashes the inserted event right moves the break to the event it pushed
    # aside: its recorded hash was made for the position before.
    "inserted event with a valid hash": (lambda events: _inserted(events, True), K + 1, K + 2),
}


@pytest.mark.parametrize("case", CASES)
def test_tampering_is_caught_at_its_position(case, live):
    change, first_changed, bad = CASES[case]
    db = database(live.data_dir)
    events = recorded(db)
    replace_events(db, change(events), first_changed)
    try:
        result = cli(live.data_dir, "verify", check=False)
        assert result.returncode == 1, result
        assert f"broken at position {bad}:" in result.stderr

        report = live.client().get("/audit/verify").json()
        assert report["ok"] is False
        assert report["firstBadPosition"] == bad
        assert report["checked"] == bad - 1
    finally:
        replace_events(db, events[first_changed - 1:], first_changed)


def test_an_untouched_log_verifies(live):
    head = len(recorded(database(live.data_dir)))
    assert cli(live.data_dir, "verify").stdout.strip() == f"ok: {head} events, head {head}"
    report = live.client().get("/audit/verify").json()
    assert report == {"ok": True, "head": head, "checked": head, "firstBadPosition": None, "reason": None}


def test_verify_of_a_missing_log_fails_rather_than_passing(tmp_path):
    result = cli(tmp_path / "typo", "verify", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"mission-control: no log at {tmp_path / 'typo' / 'mission-control.db'};")
    assert not (tmp_path / "typo").exists()


# --- digests -----------------------------------------------------------------------------


def _verify_export(data_dir: Path, tmp_path: Path, *digest: str) -> subprocess.CompletedProcess:
    export = tmp_path / "export.ndjson"
    export.write_text(cli(data_dir, "export").stdout)
    return standalone(export, *digest)


@pytest.fixture(scope="module")
def digested_source(tmp_path_factory) -> tuple[Path, int, str]:
    """A stopped app's data dir, its log with a digest taken midway and more appended after."""
    server = InProcess(tmp_path_factory.mktemp("digested") / "data").start()
    try:
        client = server.client()
        for n in range(3):
            client.post("/tasks", json={"type": "prompt", "content": f"before {n}"}).raise_for_status()
        digest = client.get("/audit/digest").json()
        for n in range(3):
            client.post("/tasks", json={"type": "prompt", "content": f"after {n}"}).raise_for_status()
        assert client.get("/audit/digest").json()["position"] == digest["position"] + 3
    finally:
        server.stop()
    return server.data_dir, digest["position"], f"{digest['position']}:{digest['hash']}"


@pytest.fixture
def digested(digested_source, tmp_path) -> tuple[Path, int, str]:
    """A copy of the digested log for one test to tamper with."""
    source, position, digest = digested_source
    shutil.copytree(source, tmp_path / "data")
    return tmp_path / "data", position, digest


def test_a_saved_digest_still_verifies_after_more_appends(digested, tmp_path):
    data_dir, _, digest = digested
    verified = cli(data_dir, "verify", "--against", digest)
    assert verified.stdout.endswith(f"; the digest checked: event {digest.split(':')[0]} still carries its hash\n")
    assert _verify_export(data_dir, tmp_path, digest).returncode == 0


def test_a_rewrite_before_the_digest_is_caught_even_when_rechained(digested, tmp_path):
    data_dir, position, digest = digested
    events = recorded(database(data_dir))
    # Change the first task's content, then rehash everything after it: a perfect chain.
    first = next(e for e in events if e.type == "task.created")
    forged = msgspec.structs.replace(
        first, payload=msgspec.Raw(bytes(first.payload).replace(b'"before 0"', b'"forged"'))
    )
    tail = rehashed([forged, *events[first.position:]], events[first.position - 2].hash)
    replace_events(database(data_dir), tail, first.position)

    assert cli(data_dir, "verify").returncode == 0  # the chain alone cannot tell
    result = cli(data_dir, "verify", "--against", digest, check=False)
    assert result.returncode == 1
    assert f"broken at position {position}: the log no longer extends the digest" in result.stderr
    standalone = _verify_export(data_dir, tmp_path, digest)
    assert standalone.returncode == 1
    assert f"broken at position {position}:" in standalone.stderr


def test_a_truncated_log_is_caught_by_the_digest(digested, tmp_path):
    data_dir, position, digest = digested
    replace_events(database(data_dir), [], position)  # the digest's event and all after it gone

    assert cli(data_dir, "verify").returncode == 0
    result = cli(data_dir, "verify", "--against", digest, check=False)
    assert result.returncode == 1
    assert result.stderr == (f"mission-control: the digest's position {position} lies beyond the head {position - 1}: "
                             "this log is shorter than the one the digest was taken of\n")
    assert _verify_export(data_dir, tmp_path, digest).returncode == 1


def test_a_malformed_digest_is_refused_in_one_line(digested):
    data_dir, _, _ = digested
    result = cli(data_dir, "verify", "--against", "12:abc", check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "POSITION:HASH" in result.stderr
