"""Lease deadlines and when each desktop was last heard from: kept in memory, never as events.

Behind `LeaseStore` so that nodes sharing one database can keep them in a table instead. The
`Keeper` (one per node) ends what lapses: a run whose lease passed its deadline, a desktop not
heard from within a lease, and every run of a desktop whose worker key was revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from events import EventLog, Meta, RecordedEvent, StorageError, TypeFilter, decode
from events import types as t
from projections.desktops import Desktop
from projections.readmodels import ReadModels
from projections.tasks import TaskState
from service.commands.deciders import LoseRun
from service.commands.desktops import MarkOffline
from service.commands.handling import Commands

log = structlog.get_logger("mission_control.leases")

KEEPER_ACTOR = "mission-control:keeper"
ENDINGS = frozenset({"task.completed", "task.review", "task.failed", "task.cancelled"})
"""The events that end a run: its lease is dropped."""
FOLLOWED = TypeFilter(["task.started", *ENDINGS, "apikey.revoked"])


class LeaseStore(Protocol):
    def renew(self, run_id: str, deadline: float) -> None:
        """The run's lease now lasts until `deadline` (a monotonic time)."""

    def drop(self, run_id: str) -> None:
        """The run ended: it holds no lease."""

    def deadline(self, run_id: str) -> float | None: ...

    def lapsed(self, now: float) -> list[str]:
        """The runs whose lease deadline has passed."""

    def heard(self, desktop_id: str, at: float) -> None:
        """The desktop's worker was heard from at `at` (monotonic)."""

    def last_heard(self, desktop_id: str) -> float | None: ...


class MemoryLeases:
    """A node's leases in its own memory (one node per database)."""

    def __init__(self) -> None:
        self._deadlines: dict[str, float] = {}
        self._heard: dict[str, float] = {}

    def renew(self, run_id: str, deadline: float) -> None:
        self._deadlines[run_id] = deadline

    def drop(self, run_id: str) -> None:
        self._deadlines.pop(run_id, None)

    def deadline(self, run_id: str) -> float | None:
        return self._deadlines.get(run_id)

    def lapsed(self, now: float) -> list[str]:
        return [run_id for run_id, deadline in self._deadlines.items() if deadline < now]

    def heard(self, desktop_id: str, at: float) -> None:
        self._heard[desktop_id] = at

    def last_heard(self, desktop_id: str) -> float | None:
        return self._heard.get(desktop_id)


def wall_time(monotonic_at: float, now: float) -> str:
    """A monotonic instant as the UTC time it was (or will be), for sentences."""
    at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=now - monotonic_at)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


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
    process appended the revocation: the tail sees other writers' appends too)."""

    def __init__(
        self, log_: EventLog, models: ReadModels, commands: Commands, leases: LeaseStore,
        lease_seconds: float, node_desktop: str | None, clock: Callable[[], float] = time.monotonic,
    ):
        self.log, self.models, self.commands, self.leases = log_, models, commands, leases
        self.lease_seconds = lease_seconds
        self.node_desktop = node_desktop
        """This node's own desktop: its runs were ended by recovery and it is heard by polling."""
        self.clock = clock
        self.counted_from: dict[str, float] = {}
        """Each desktop's silence is counted from here at the earliest (this node's start, or when
        the node first saw it): never shown as a time it was heard from."""
        self.runs: dict[str, str] = {}
        """Each run holding a lease, to its task."""
        self._jobs: list[asyncio.Task] = []

    async def start(self) -> None:
        after = await self.prepare()
        self._jobs = [
            asyncio.create_task(self._follow(after), name="mc-lease-tail"),
            asyncio.create_task(self._sweeping(), name="mc-lease-keeper"),
        ]

    async def prepare(self) -> int:
        """After a restart: every active run not on this node's desktop gets one fresh lease, every
        desktop not offline has its silence counted from now: both get one period to be heard from. Returns the
        log position the tail is to follow from (taken before the snapshot: it replays anything newer)."""
        after = self.log.head
        now = self.clock()
        for task in await self.models.active_runs():
            if task.run_id and not await self._anothers_node(task.run_desktop_id):
                self.runs[task.run_id] = task.id
                self.leases.renew(task.run_id, now + self.lease_seconds)
        for desktop in await self.models.desktops():
            if desktop.status != "offline":
                self.counted_from[desktop.id] = now
        return after

    async def close(self) -> None:
        for job in self._jobs:
            job.cancel()
        for job in self._jobs:
            with contextlib.suppress(asyncio.CancelledError):
                await job
        self._jobs = []

    async def _anothers_node(self, desktop_id: str | None) -> bool:
        """A desktop of another node sharing the database: that node keeps its leases."""
        if desktop_id is None or desktop_id == self.node_desktop:
            return False
        desktop = await self.models.desktop(desktop_id)
        return desktop is not None and desktop.node

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
            if not await self._anothers_node(data.desktop_id):
                self.runs[data.run_id] = data.task_id
                # Measured from now, never shortened: a report may have renewed it already.
                deadline = self.clock() + self.lease_seconds
                self.leases.renew(data.run_id, max(deadline, self.leases.deadline(data.run_id) or 0))
        elif event.type in ENDINGS:
            run_id = getattr(data, "run_id", None)
            if run_id:
                self.runs.pop(run_id, None)
                self.leases.drop(run_id)
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
        now = self.clock()
        for run_id in self.leases.lapsed(now):
            deadline = self.leases.deadline(run_id)
            task = await self.models.task(self.runs.get(run_id, ""), with_watchers=False)
            if task is not None and task.run_id == run_id and deadline is not None:
                desktop = task.run_desktop_id or "(unnamed)"
                await lose(self.commands, task, lapsed(desktop, deadline, now))
            self.runs.pop(run_id, None)
            self.leases.drop(run_id)
        for desktop in await self.models.desktops():
            if desktop.status == "offline" or await self._anothers_node(desktop.id):
                continue
            heard = self.leases.last_heard(desktop.id)
            since = max(heard or 0.0, self.counted_from.setdefault(desktop.id, now))
            if since + self.lease_seconds < now:
                await self.silent(desktop, since + self.lease_seconds, now)

    async def silent(self, desktop: Desktop, since: float, now: float) -> None:
        _, recorded = await self.commands.desktop(
            desktop.id, MarkOffline(reason="silent", epoch=desktop.epoch), Meta(actor=KEEPER_ACTOR)
        )
        if recorded:
            log.warning("desktop went silent", desktop=desktop.id)
        for task in await self.models.active_runs(desktop.id):
            await lose(self.commands, task, lapsed(desktop.id, since, now))


def lapsed(desktop_id: str, deadline: float, now: float) -> str:
    return f"Desktop {desktop_id} stopped reporting on this run; its lease lapsed at {wall_time(deadline, now)}."
