"""Export, the standalone verifier and import: one file an auditor can check and replay.

The round trip runs on MC_AUDIT_EVENTS events: by default 12,000, enough that every stage crosses
its page boundaries (export and verify read 5,000 a page, import writes 5,000 a chunk, the bar
moves every 5,000), which is all that size changes in what the test checks. The issue's figure
runs with MC_AUDIT_EVENTS=100000 (about 15 s on two cores).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from events import RecordedEvent, chain_hash
from tests.audit_sqlite import database, read_models, recorded
from tests.audit_tools import differences, fill, settled, standalone, with_terminal_stderr
from tests.server import cli

pytestmark = pytest.mark.sqlite_file

FIXTURE = Path(__file__).parent / "fixtures" / "v1-log.ndjson"
ROUND_TRIP_EVENTS = int(os.environ.get("MC_AUDIT_EVENTS", 12_000))


# --- export ----------------------------------------------------------------------------------


def test_get_events_as_ndjson_serves_the_export_byte_for_byte(shared_app_server):
    client = shared_app_server.client()
    for n in range(3):
        task = client.post("/tasks", json={"type": "prompt", "content": f"line {n}\n\u00e9\u2028"}).json()
        client.post(f"/tasks/{task['id']}/run").raise_for_status()
        settled(client, task["id"])
    served = client.get("/events", headers={"Accept": "application/x-ndjson"})
    exported = cli(shared_app_server.data_dir, "export")
    assert served.content == exported.stdout.encode()
    head = client.get("/events", params={"limit": 1}).json()["head"]
    assert len(served.content.splitlines()) == head


# --- the round trip --------------------------------------------------------------------------


def test_export_verify_import_round_trip(tmp_path):
    source, replica, export = tmp_path / "source", tmp_path / "replica", tmp_path / "log.ndjson"
    asyncio.run(fill(database(source), ROUND_TRIP_EVENTS))

    # With a terminal watching, the bar goes to the terminal and never into the export.
    status, shown = with_terminal_stderr(source, "export", stdout=export)
    assert status == 0 and "exporting" in shown

    checked = standalone(export)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"ok: {ROUND_TRIP_EVENTS} events")

    status, shown = with_terminal_stderr(replica, "import", str(export), stdout=tmp_path / "imported")
    assert status == 0 and "importing" in shown
    assert (tmp_path / "imported").read_text() == f"imported {ROUND_TRIP_EVENTS} events into {database(replica)}\n"
    assert not differences(read_models(database(replica)), read_models(database(source)))
    assert cli(replica, "export").stdout.encode() == export.read_bytes()

    status, shown = with_terminal_stderr(replica, "verify", stdout=tmp_path / "verified")
    assert status == 0 and "verifying" in shown
    assert (tmp_path / "verified").read_text() == f"ok: {ROUND_TRIP_EVENTS} events, head {ROUND_TRIP_EVENTS}\n"


# --- refusing a broken file ------------------------------------------------------------------

K = 9  # a task.failed line in the fixture


def _set(number: int, change: Callable[[dict], None]) -> Callable[[list[str]], list[str]]:
    """Change the object on line `number` (1-based), writing it back compact, keys in order,
    so that the change is the only difference."""

    def edit(lines: list[str]) -> list[str]:
        event = json.loads(lines[number - 1])
        change(event)
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return [*lines[: number - 1], line + "\n", *lines[number:]]

    return edit


def _rehashed_with_spaces(lines: list[str]) -> list[str]:
    """Line K's payload spaced out and its hash made over those very bytes: only the canonical-
    form rule (API.md hashes the served JSON re-serialised) tells it from the original."""
    event = msgspec.json.decode(lines[K - 1].encode(), type=RecordedEvent)
    spaced = json.dumps(json.loads(bytes(event.payload)), sort_keys=True).encode()
    forged = msgspec.structs.replace(event, payload=msgspec.Raw(spaced))
    forged = msgspec.structs.replace(forged, hash=chain_hash(json.loads(lines[K - 2])["hash"], forged))
    return [*lines[: K - 1], msgspec.json.encode(forged).decode() + "\n", *lines[K:]]

BROKEN: dict[str, tuple[Callable[[list[str]], list[str]], int]] = {
    # name: (how the file is broken, the position both checkers report)
    "modified payload": (_set(K, lambda e: e["payload"].update(error="nothing wrong")), K),
    "modified last event": (_set(19, lambda e: e.update(recordedAt="2020-01-01T00:00:00Z")), 19),
    "missing line": (lambda lines: lines[: K - 1] + lines[K:], K),
    "swapped lines": (lambda lines: [*lines[: K - 1], lines[K], lines[K - 1], *lines[K + 1:]], K),
    "repeated line": (lambda lines: [*lines[:K], lines[K - 1], *lines[K:]], K + 1),
    "garbage line": (lambda lines: [*lines[: K - 1], "not json\n", *lines[K:]], K),
    "added field": (_set(K, lambda e: e.update(note="hi")), K),
    "payload not canonical": (_rehashed_with_spaces, K),
}


@pytest.mark.parametrize("case", BROKEN)
def test_import_refuses_a_broken_file_at_its_position_and_imports_nothing(case, tmp_path):
    break_, position = BROKEN[case]
    broken = tmp_path / "broken.ndjson"
    broken.write_text("".join(break_(FIXTURE.read_text().splitlines(keepends=True))))

    result = cli(tmp_path / "replica", "import", str(broken), check=False)
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"mission-control: refused {broken}, nothing imported: broken at position {position}:")
    assert result.stderr.count("\n") == 1
    assert len(recorded(database(tmp_path / "replica"))) == 0

    checked = standalone(broken)
    assert checked.returncode == 1
    assert checked.stderr.startswith(f"broken at position {position}:")


def test_import_needs_an_empty_data_dir(tmp_path):
    cli(tmp_path / "replica", "import", str(FIXTURE))
    again = cli(tmp_path / "replica", "import", str(FIXTURE), check=False)
    assert again.returncode == 2
    assert again.stderr == (
        f"mission-control: {database(tmp_path / 'replica')} already holds 19 events; import needs an empty data dir\n"
    )
    assert len(recorded(database(tmp_path / "replica"))) == 19


def test_import_of_a_missing_file_is_one_line(tmp_path):
    result = cli(tmp_path / "replica", "import", str(tmp_path / "nope.ndjson"), check=False)
    assert result.returncode == 2
    assert result.stderr == f"mission-control: no file {tmp_path / 'nope.ndjson'}\n"


def test_standalone_verifier_checks_a_digest(tmp_path):
    tenth = json.loads(FIXTURE.read_text().splitlines()[9])
    assert standalone(FIXTURE, f"10:{tenth['hash']}").returncode == 0
    wrong = standalone(FIXTURE, f"10:{'0' * 64}")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("broken at position 10: it no longer carries the digest's hash")
    beyond = standalone(FIXTURE, f"20:{tenth['hash']}")
    assert beyond.returncode == 1 and "lies beyond the last event, 19" in beyond.stderr
    assert standalone(FIXTURE, "ten:abc").returncode == 2
