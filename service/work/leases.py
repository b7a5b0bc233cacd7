"""Lease deadlines and when each desktop was last heard from: in tables of the log's database (a
file beside the log's, on SQLite) that every node sharing it reads and writes (never as events), so a worker may renew through any
node and any node's `Keeper` may end what lapsed. The database computes and compares the
deadlines (PostgreSQL by its own clock, one for every machine: a node's skewed clock cannot lapse
a lease early); each backend's SQL is in service/work/leasestore/<backend>.py.

The `Keeper` (one per node) ends what lapses, on every desktop including other nodes' own (a node
killed for good has its runs recorded lost by another): a run whose lease passed its deadline, a
desktop not heard from within a lease, and every run of a desktop whose worker key was revoked.
Keepers racing on one lapse record it once: `lose` is fenced by the run and its lease epoch,
`MarkOffline` by the desktop's epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import structlog

from events import EventLog, Meta, RecordedEvent, StorageError, TypeFilter, decode, rfc3339
from events import types as t
from projections.desktops import Desktop
from projections.readmodels import ReadModels
from projections.tasks import TaskState
from service.commands.deciders import LoseRun
from service.commands.desktops import MarkOffline
from service.commands.handling import Commands
from service.work.jobs import cancelled

log = structlog.get_logger("mission_control.leases")

KEEPER_ACTOR = "mission-control:keeper"
ENDINGS = frozenset({"task.completed", "task.review", "task.failed", "task.cancelled"})
"""The events that end a run: its lease is dropped."""
FOLLOWED = TypeFilter(["task.started", *ENDINGS, "apikey.revoked"])


class Lapse(NamedTuple):
    run_id: str
    task_id: str
    deadline: datetime.datetime
    """When it lapsed (UTC)."""


class LeaseStore(Protocol):
    """Shared by every node on the log's database; every duration is measured by the database."""

    async def prepare(self) -> None:
        """Its tables, made if the database has none yet."""

    async def close(self) -> None: ...

    async def grant(self, run_id: str, task_id: str, seconds: float) -> None:
        """The run (of the task) holds a lease until `seconds` from now at least: never shortened."""

    async def renew(self, desktop_id: str, run_ids: Sequence[str], seconds: float) -> None:
        """A report from the desktop's worker: it was heard from now, and those of the runs whose
        lease has not lapsed hold it until `seconds` from now at least. An ended run holds none
        and a lapsed one is not revived (it is to be recorded lost)."""

    async def drop(self, run_id: str) -> None:
        """The run ended: it holds no lease."""

    async def lapsed(self, run_ids: Sequence[str] | None = None) -> list[Lapse]:
        """The leases, of these runs or of all, whose deadline has passed."""

    async def heard(self, desktop_id: str) -> None:
        """The desktop's worker was heard from now."""

    async def last_heard(self, desktop_id: str) -> datetime.datetime | None:
        """When it was last heard from (UTC)."""

    async def silences(self) -> dict[str, float]:
        """Each desktop heard from: the seconds since it was last."""


def open_leases(log_: EventLog) -> LeaseStore:
    """The lease store of `log_`'s backend, in its database. `prepare` it before use."""
    return importlib.import_module(f"service.work.leasestore.{log_.backend}").open_leases(log_)


async def lose(commands: Commands, task: TaskState, error: str) -> bool:
    """End the task's current run `lost`, fenced by its run and epoch: whoever sees the lapse first
    records it, every later try records nothing. True if this call recorded it. Its cause is the
    run's `task.started` (an event id, which the run's id is not)."""
    meta = Meta(actor=KEEPER_ACTOR, causation_id=str(task.placed_position))
    command = LoseRun(run_id=task.run_id or "", epoch=task.lease_epoch, error=error)
    _, recorded = await commands.task(task.id, command, meta)
    return bool(recorded)


class Keeper:
    """One task per node, waking every lease/4, so a lapse is recorded between one lease and 1.25
    leases after the last renewal; and a follower of the log's tail, which grants each placed run
    its first lease, drops an ended run's, and acts on a revoked worker key at once (whichever
    process appended the revocation: the tail sees other writers' appends too). Every node's
    keeper does all of it: the store's writes are idempotent and the appends fenced."""

    def __init__(
        self, log_: EventLog, models: ReadModels, commands: Commands, leases: LeaseStore, lease_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log, self.models, self.commands, self.leases = log_, models, commands, leases
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.counted_from: dict[str, float] = {}
        """Each desktop's silence, as this node sees it, is counted from here at the earliest (this
        node's start, or when it first saw the desktop; its monotonic clock): never shown as a time
        it was heard from."""
        self._jobs: list[asyncio.Task] = []

    async def start(self) -> None:
        after = await self.prepare()
        self._jobs = [
            asyncio.create_task(self._follow(after), name="mc-lease-tail"),
            asyncio.create_task(self._sweeping(), name="mc-lease-keeper"),
        ]

    async def prepare(self) -> int:
        """At this node's start: every active run holds a lease of one period from now at least,
        and every desktop not offline has its silence counted from now: both get one period to be
        heard from (through any node). Returns the log position the tail is to follow from (taken
        before the snapshot: it replays anything newer)."""
        after = self.log.head
        for task in await self.models.active_runs():
            if task.run_id:
                await self.leases.grant(task.run_id, task.id, self.lease_seconds)
        now = self.clock()
        for desktop in await self.models.desktops():
            if desktop.status != "offline":
                self.counted_from[desktop.id] = now
        return after

    async def close(self) -> None:
        await cancelled(self._jobs)
        self._jobs = []

    async def _follow(self, after: int) -> None:
        async with contextlib.aclosing(self.log.tail(after, types=FOLLOWED)) as events:
            async for event in events:
                try:
                    await self.seen(event)
                except Exception:  # one bad moment must not stop the keeper for good
                    log.exception("lease keeper could not handle an event", position=event.position)

    async def seen(self, event: RecordedEvent) -> None:
        data = decode(event)
        if isinstance(data, t.TaskStarted):
            # Never shortened: a report through another node may have renewed it already.
            await self.leases.grant(data.run_id, data.task_id, self.lease_seconds)
        elif event.type in ENDINGS:
            run_id = getattr(data, "run_id", None)
            if run_id:
                await self.leases.drop(run_id)
        elif isinstance(data, t.ApiKeyRevoked):
            for desktop in await self.models.desktops():
                if desktop.key_id == data.key_id and desktop.status != "offline":
                    await self.revoked(desktop)

    async def revoked(self, desktop: Desktop) -> None:
        for task in await self.models.active_runs(desktop.id):
            await lose(self.commands, task, f"Desktop {desktop.id} lost this run: its worker key was revoked.")
        await self.commands.desktop(
            desktop.id, MarkOffline(reason="revoked", epoch=desktop.epoch), Meta(actor=KEEPER_ACTOR)
        )

    async def _sweeping(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 4)
            try:
                await self.sweep()
            except StorageError as exc:  # the database away: the next sweep does what this could not
                log.warning("lease sweep failed: the log's storage failed", error=str(exc))
            except Exception:
                log.exception("lease sweep failed")

    async def sweep(self) -> None:
        """Once: end every run whose lease lapsed, and turn silent desktops offline."""
        for lapse in await self.leases.lapsed():
            task = await self.models.task(lapse.task_id, with_watchers=False)
            if task is not None and task.run_id == lapse.run_id:
                await lose(self.commands, task, lapsed(task.run_desktop_id or "(unnamed)", lapse.deadline))
            await self.leases.drop(lapse.run_id)
        silences, now = await self.leases.silences(), self.clock()
        for desktop in await self.models.desktops():
            if desktop.status == "offline":
                continue
            counted = now - self.counted_from.setdefault(desktop.id, now)
            overdue = min(silences.get(desktop.id, counted), counted) - self.lease_seconds
            if overdue > 0:
                await self.silent(desktop, overdue)

    async def silent(self, desktop: Desktop, overdue: float) -> None:
        """The desktop was not heard from within a lease, which ended `overdue` seconds ago."""
        _, recorded = await self.commands.desktop(
            desktop.id, MarkOffline(reason="silent", epoch=desktop.epoch), Meta(actor=KEEPER_ACTOR)
        )
        if recorded:
            log.warning("desktop went silent", desktop=desktop.id)
        ended = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=overdue)
        for task in await self.models.active_runs(desktop.id):
            await lose(self.commands, task, lapsed(desktop.id, ended))


def lapsed(desktop_id: str, deadline: datetime.datetime) -> str:
    return f"Desktop {desktop_id} stopped reporting on this run; its lease lapsed at {rfc3339(deadline, 'seconds')}."
