"""Acknowledged appends survive the appending process being killed at a random moment."""

from __future__ import annotations

import asyncio
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from events import RecordedEvent, decode, open_log
from tests.chain_audit import audit

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 5


def run_and_kill(db: Path, delay: float, run_id: str) -> dict[int, str]:
    """Runs an appending child, SIGKILLs it `delay` s after its first acknowledgement;
    returns the acknowledged positions with their hashes."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_child", str(db), "--concurrency", "8", "--multi", "--run-id", run_id],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    # Drain stdout while waiting, so a full pipe never holds the child back.
    reader = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True)
    reader.start()
    try:
        assert lines.get(timeout=30) == "ready\n"
        first = lines.get(timeout=30)
        time.sleep(delay)  # the moment of the crash: random by design, nothing waits on it
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        reader.join(10)
    assert child.returncode == -signal.SIGKILL
    acknowledged = [first] + list(lines.queue)
    return {int(p): h for p, h in (line.split() for line in acknowledged if line.endswith("\n"))}


async def reopened(db: Path) -> list[RecordedEvent]:
    log = open_log(str(db))
    await log.open()
    try:
        got, after = [], 0
        while page := (await log.read_all(after, 5000)).events:
            got.extend(page)
            after = page[-1].position
        assert log.head == len(got)
        return got
    finally:
        await log.close()


def test_acknowledged_appends_survive_sigkill(tmp_path):
    db = tmp_path / "crash.db"
    rng = random.Random()
    acknowledged: dict[int, str] = {}
    for round_ in range(ROUNDS):  # one file through every crash: recovery, then more appends
        delay = rng.uniform(0.3, 1.5)
        acked = run_and_kill(db, delay, run_id=f"round-{round_}")
        assert acked, f"round {round_}: nothing acknowledged"
        acknowledged |= acked
        print(f"round {round_}: {len(acked)} acknowledged")

        recorded = asyncio.run(reopened(db))
        context = f"round {round_}, killed {delay:.2f}s after the first acknowledgement"
        assert audit(recorded) == len(recorded), context  # positions 1..head, chain intact
        stored = {e.position: e.hash for e in recorded}
        missing = [p for p, h in acknowledged.items() if stored.get(p) != h]
        assert not missing, f"{context}: acknowledged but lost or changed: {missing[:10]}"
        # Appends are atomic: each stream's versions run on without a gap.
        versions: dict[str, int] = {}
        for event in recorded:
            versions[event.stream] = versions.get(event.stream, 0) + 1
            assert event.version == versions[event.stream], f"{context}: version gap at {event.position}"
        # ...and whole: a child's append number n held 1 + n % 3 events.
        sizes = Counter((data.run_id, data.seq) for data in map(decode, recorded))
        assert all(size == 1 + n % 3 for (_, n), size in sizes.items()), context
