"""Writes tests/fixtures/v1-log.ndjson: a small log recorded when every event type was at schema 1.

Run once, as `python -m tests.make_v1_fixture`, before task.failed moved to schema 2; the
committed file is the fixture. It refuses to run once any type is past schema 1, since it
would then record today's shapes, not the old ones the schema-evolution tests need.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from events import EVENT_TYPES
from tests.audit_tools import settled
from tests.server import Server, cli

FIXTURE = Path(__file__).parent / "fixtures" / "v1-log.ndjson"


def main() -> int:
    newer = sorted(name for name, cls in EVENT_TYPES.items() if cls.schema != 1)
    if newer:
        print(f"refusing: already past schema 1: {', '.join(newer)}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "data").start()
        try:
            client = server.client()
            # A run that fails with an error, and a review that is rejected: both record task.failed.
            broken = client.post("/tasks", json={
                "type": "prompt", "title": "broken", "content": "hello", "metadata": {"echo": {"fail": "disk full"}},
            }).json()
            reviewed = client.post("/tasks", json={
                "type": "prompt", "title": "reviewed", "content": "draft", "requiresApproval": True,
            }).json()
            fine = client.post("/tasks", json={"type": "prompt", "title": "fine", "content": "all good"}).json()
            for task in (broken, reviewed, fine):
                client.post(f"/tasks/{task['id']}/run").raise_for_status()
                settled(client, task["id"])
            client.post(f"/tasks/{reviewed['id']}/review", json={"decision": "reject", "feedback": "too vague"})
            client.post(f"/tasks/{fine['id']}/presence", json={"deviceId": "laptop"}).raise_for_status()
        finally:
            server.stop()
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(cli(server.data_dir, "export").stdout)
    print(f"wrote {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
