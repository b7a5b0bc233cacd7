"""The chain is RFC 8785 (JCS) byte for byte, as an independent implementation (the `rfc8785`
package) computes it, over keys where code-point and UTF-16 order differ: characters outside
the BMP beside U+E000-U+FFFF, nested, in task metadata and agent config, written through the
real API. A log hashed the old way (keys in code-point order) is named as such by `verify`
and carried forward by `import --rechain`, never silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgspec
import pytest
import rfc8785

from events import GENESIS_HASH, RecordedEvent, canonical_json
from tests.audit_sqlite import database, recorded, replace_events
from tests.audit_tools import rehashed, standalone
from tests.chain_audit import audit, verify_export
from tests.inprocess import InProcess
from tests.server import cli

pytestmark = pytest.mark.sqlite_file

# 😀 and 🚀 sort after U+E000-U+FFFF by code point, before them by UTF-16 code unit.
MIXED = {
    "\U0001F600": 1, "\ue000": 2, "\U000E0067": "tag",
    "nested": {"\uffff": [{"\U0001F680": True, "\uf8ff": None}], "\U00010000": "x", "\uff0c": {}},
}
CODE_POINT_ORDER = "hashed with code-point key order (the pre-RFC 8785 canonical form), not tampered with"


@pytest.fixture(scope="module")
def mixed(shared_app_server) -> InProcess:
    """A log whose task metadata and agent config hold MIXED, created and updated over HTTP."""
    client = shared_app_server.client()
    task = client.post("/tasks", json={"type": "prompt", "content": "jcs", "metadata": MIXED}).json()
    client.patch(f"/tasks/{task['id']}", json={"metadata": {"\U0001F600": MIXED, "\ue000": [MIXED]}}).raise_for_status()
    agent = client.post("/agents", json={"name": "jcs", "kind": "echo", "config": MIXED}).json()
    client.patch(f"/agents/{agent['id']}", json={"config": {"list": [MIXED], "\ufffd": 0}}).raise_for_status()
    return shared_app_server


def export_of(server: InProcess) -> bytes:
    return server.client().get("/events", headers={"Accept": "application/x-ndjson"}).content


def jcs_break(export: bytes) -> int | None:
    """The first position whose hash is not sha256(previous + rfc8785(event without hash))."""
    previous = GENESIS_HASH
    for line in export.splitlines():
        event = json.loads(line)
        stored = event.pop("hash")
        if hashlib.sha256(bytes.fromhex(previous) + rfc8785.dumps(event)).hexdigest() != stored:
            return event["position"]
        previous = stored
    return None


def code_point_form(raw: bytes) -> bytes:
    return json.dumps(json.loads(bytes(raw)), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def legacy(events: list[RecordedEvent]) -> list[RecordedEvent]:
    """The events as the log wrote them before RFC 8785: keys in code-point order, hashed so."""
    return rehashed([
        msgspec.structs.replace(e, payload=msgspec.Raw(code_point_form(e.payload)), meta=msgspec.Raw(code_point_form(e.meta)))
        for e in events
    ])


def first_reordered(events: list[RecordedEvent]) -> int:
    return next(e.position for e in events if code_point_form(e.payload) != bytes(e.payload))


def ndjson(events: list[RecordedEvent]) -> bytes:
    return b"".join(msgspec.json.encode(e) + b"\n" for e in events)


def test_every_checker_agrees_with_rfc8785_over_keys_that_mix_planes(mixed, tmp_path):
    export = export_of(mixed)
    payloads = [json.loads(line)["payload"] for line in export.splitlines()]
    assert sum(rfc8785.dumps(p) != code_point_form(json.dumps(p).encode()) for p in payloads) >= 4

    assert jcs_break(export) is None
    for payload in payloads:
        assert canonical_json(payload) == verify_export.canonical(payload) == rfc8785.dumps(payload)
    (tmp_path / "log.ndjson").write_bytes(export)
    checked = standalone(tmp_path / "log.ndjson")
    assert checked.returncode == 0, checked.stderr
    head = len(payloads)
    assert audit(recorded(database(mixed.data_dir))) == head
    assert cli(mixed.data_dir, "verify").stdout == f"ok: {head} events, head {head}\n"
    assert mixed.client().get("/audit/verify").json()["ok"] is True


def test_an_export_rehashed_by_true_jcs_is_accepted_by_import(mixed, tmp_path):
    lines, previous = [], GENESIS_HASH
    for line in export_of(mixed).splitlines():
        event = json.loads(line)
        del event["hash"]
        previous = hashlib.sha256(bytes.fromhex(previous) + rfc8785.dumps(event)).hexdigest()
        lines.append(rfc8785.dumps({**event, "hash": previous}) + b"\n")
    (tmp_path / "jcs.ndjson").write_bytes(b"".join(lines))

    result = cli(tmp_path / "replica", "import", str(tmp_path / "jcs.ndjson"), check=False)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["hash"] for line in cli(tmp_path / "replica", "export").stdout.splitlines()] == [
        json.loads(line)["hash"] for line in lines
    ]


def test_verify_names_an_event_hashed_with_code_point_order_rather_than_tampering(mixed, tmp_path):
    db = database(mixed.data_dir)
    events = recorded(db)
    old, bad = legacy(events), first_reordered(events)
    replace_events(db, old, 1)
    try:
        result = cli(mixed.data_dir, "verify", check=False)
        assert result.returncode == 1
        assert result.stderr.startswith(f"broken at position {bad}: {CODE_POINT_ORDER}")
        assert "import --rechain" in result.stderr

        report = mixed.client().get("/audit/verify").json()
        assert (report["ok"], report["firstBadPosition"], report["checked"]) == (False, bad, bad - 1)
        assert report["reason"].startswith(CODE_POINT_ORDER)
    finally:
        replace_events(db, events, 1)

    (tmp_path / "old.ndjson").write_bytes(ndjson(old))
    checked = standalone(tmp_path / "old.ndjson")
    assert checked.returncode == 1
    assert checked.stderr.startswith(f"broken at position {bad}: {CODE_POINT_ORDER}")


def test_plain_import_refuses_an_old_log_and_import_rechain_carries_it_forward(mixed, tmp_path):
    events = recorded(database(mixed.data_dir))
    old, bad = legacy(events), first_reordered(events)
    source = tmp_path / "old.ndjson"
    source.write_bytes(ndjson(old))

    refused = cli(tmp_path / "plain", "import", str(source), check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"mission-control: refused {source}, nothing imported: "
                                     f"broken at position {bad}: {CODE_POINT_ORDER}")
    assert recorded(database(tmp_path / "plain")) == []

    carried = cli(tmp_path / "new", "import", "--rechain", str(source), check=False)
    assert carried.returncode == 0, carried.stderr
    head = len(events) + 1
    assert f"re-hashed in RFC 8785 form from position {bad}" in carried.stdout
    assert f"the old head {len(old)}:{old[-1].hash} is recorded at position {head}" in carried.stdout

    export = cli(tmp_path / "new", "export").stdout.encode()
    lines = export.splitlines(keepends=True)
    assert b"".join(lines[:-1]) == ndjson(events)  # the events exactly as RFC 8785 writes them
    provenance = json.loads(lines[-1])
    assert (provenance["position"], provenance["type"], provenance["meta"]["actor"]) == (
        head, "log.rechained", "mission-control:cli",
    )
    assert provenance["payload"] == {
        "previousHead": len(old), "previousHash": old[-1].hash, "firstChanged": bad,
        "changed": sum(bytes(a.payload) != bytes(b.payload) for a, b in zip(old, events)),
    }
    assert jcs_break(export) is None
    assert cli(tmp_path / "new", "verify").stdout == f"ok: {head} events, head {head}\n"


def test_rechain_still_refuses_an_old_log_that_was_tampered_with(mixed, tmp_path):
    old = legacy(recorded(database(mixed.data_dir)))
    last = old[-1]
    forged = msgspec.structs.replace(last, payload=msgspec.Raw(bytes(last.payload).replace(b'"x"', b'"y"')))
    assert bytes(forged.payload) != bytes(last.payload)
    (tmp_path / "old.ndjson").write_bytes(ndjson([*old[:-1], forged]))

    result = cli(tmp_path / "new", "import", "--rechain", str(tmp_path / "old.ndjson"), check=False)
    assert result.returncode == 1
    assert f"broken at position {last.position}: the hash does not match" in result.stderr
    assert recorded(database(tmp_path / "new")) == []


def test_rechain_of_a_chain_that_holds_imports_it_as_it_is(mixed, tmp_path):
    source: Path = tmp_path / "log.ndjson"
    source.write_bytes(export_of(mixed))
    result = cli(tmp_path / "new", "import", "--rechain", str(source))
    assert "nothing needed re-hashing" in result.stdout
    assert cli(tmp_path / "new", "export").stdout.encode() == source.read_bytes()
