"""Helpers the auditor's tests share: a settled task, a filled log, the CLI on a terminal.
The log file as an attacker sees it is in tests/audit_sqlite.py."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import msgspec

from events import GENESIS_HASH, RecordedEvent, chain_hash
from tests.api_helpers import wait_for
from tests.chain_audit import VERIFY_EXPORT

SETTLED = {"review", "done", "failed", "cancelled"}


def settled(client: httpx.Client, task_id: str) -> dict:
    """The task once its run has ended (or waits for a review)."""

    def probe():
        task = client.get(f"/tasks/{task_id}").json()
        return task if task["status"] in SETTLED else None

    return wait_for(probe, 20, f"task {task_id} to finish its run")


def differences(a: dict[str, list[tuple]], b: dict[str, list[tuple]]) -> dict[str, tuple[list, list]]:
    """Per table, the rows only `a` has and the rows only `b` has; empty when they are equal."""
    found = {}
    for table in a.keys() | b.keys():
        rows_a, rows_b = set(a.get(table, [])), set(b.get(table, []))
        if rows_a != rows_b:
            found[table] = (sorted(rows_a - rows_b), sorted(rows_b - rows_a))
    return found


def rehashed(events: list[RecordedEvent], previous: str = GENESIS_HASH) -> list[RecordedEvent]:
    """The events with every hash recomputed from `previous` on: a forger's perfect chain."""
    out = []
    for event in events:
        previous = chain_hash(previous, event)
        out.append(msgspec.structs.replace(event, hash=previous))
    return out


async def fill(db: Path, count: int, appends_at_once: int = 2000) -> None:
    """About `count` events of every kind the read models fold, appended through the log API
    with its projector, as the service would: ten events a task, in one append each."""
    import asyncio

    from events import Meta, open_log
    from events import types as t
    from projections.readmodels import read_models

    def task_events(n: int) -> list[t.EventData]:
        task, run = f"task{n}", f"run{n}"
        events: list[t.EventData] = [
            t.TaskCreated(task_id=task, type="prompt", content=f"job {n}", project_id=f"p{n % 7}",
                          created_by="filler", requires_approval=n % 3 == 0, metadata={"n": n}),
            t.TaskStarted(task_id=task, run_id=run, agent_id="a1"),
            *(t.TaskOutput(task_id=task, run_id=run, seq=s, stream="stdout", chunk=f"{n}.{s}\n") for s in range(5)),
        ]
        if n % 3 == 0:
            return [*events, t.TaskReview(task_id=task, run_id=run, result="draft"),
                    t.ApprovalCreated(approval_id=f"ap{n}", task_id=task, run_id=run),
                    t.ApprovalResolved(approval_id=f"ap{n}", task_id=task, decision="approve")]
        if n % 3 == 1:
            return [*events, t.TaskFailed(task_id=task, run_id=run, reason="exit", error="exit 1", exit_code=1),
                    t.TaskRetried(task_id=task), t.TaskUpdated(task_id=task, title=f"again {n}")]
        return [*events, t.TaskCompleted(task_id=task, run_id=run, result="ok"),
                t.TaskArchived(task_id=task), t.TaskUpdated(task_id=task, priority=1 + n % 10)]

    log = open_log(str(db), durable=False)
    models = read_models(log)
    await log.open()
    try:
        await models.prepare()
        await log.append("agent-a1", [t.AgentRegistered(agent_id="a1", name="filler", kind="echo")])
        tasks = range(max(1, (count - 2) // 10))
        marks = max(1, count - 1 - 10 * len(tasks))  # the remainder, so the log holds exactly `count`
        await log.append("presence-task0", [t.PresenceMarked(task_id="task0", device_id="d1")] * marks)
        for start in range(0, len(tasks), appends_at_once):
            await asyncio.gather(*(
                log.append(f"task-task{n}", task_events(n), meta=Meta(actor="filler"))
                for n in tasks[start:start + appends_at_once]
            ))
    finally:
        await log.close()


def with_terminal_stderr(data_dir: Path, *args: str, stdout: Path) -> tuple[int, str]:
    """Run `mission-control ARGS` with stdout to a file and stderr on a terminal (a pty);
    returns the exit status and what the terminal showed."""
    controller, terminal = pty.openpty()
    shown = bytearray()

    def drain() -> None:  # read as it comes, so a full pty buffer never stalls the command
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal side closed
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with stdout.open("wb") as out:
        process = subprocess.run(
            [sys.executable, "-m", "service.cli", *args, "--data-dir", str(data_dir)],
            stdout=out, stderr=terminal, timeout=120,
        )
    os.close(terminal)
    reader.join(10)
    os.close(controller)
    return process.returncode, shown.decode(errors="replace")


def standalone(export: Path, *digest: str) -> subprocess.CompletedProcess:
    """scripts/verify_export.py as an auditor runs it: -I -S, so nothing but the standard library loads."""
    return subprocess.run(
        [sys.executable, "-I", "-S", str(VERIFY_EXPORT), str(export), *digest], capture_output=True, text=True,
    )
