"""The dispatcher: starts queued runs as slots free, in queue order.

One per node. A pass reads the queue (priority, highest first; then first queued first) and gives
each queued run its turn (`DispatchRun`): it starts if a slot, a desktop that can run it and its
dependencies allow, fails if it waited past its `queueTimeoutSeconds` or a dependency failed, and
otherwise stays queued without holding up the runs behind it. A pass runs under the admission lock
that every node's `POST /tasks/{id}/run` takes too, so the concurrency limit and each desktop's
capacity hold across nodes, and every start is an append at the task's expected version: a node
that loses a race records nothing. Passes are woken by the log's tail when something that frees a
slot, a desktop or a dependency is recorded (by any node), at the next queue deadline, and by a
periodic sweep in case a wake-up was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime

import structlog

from events import EventLog, Meta, TypeFilter, now_rfc3339, parse_rfc3339
from events import types as t
from projections.agents import Agent
from projections.readmodels import ReadModels
from service.commands.deciders import DispatchRun, Refused, decide
from service.commands.handling import Commands
from service.work.jobs import cancelled
from service.work.leases import ENDINGS

log = structlog.get_logger("mission_control.dispatch")

DISPATCHER_ACTOR = "mission-control:dispatcher"
WAKES = TypeFilter([*ENDINGS, "desktop.", "agent."])
"""What may let a queued run start or end: a run ending (a slot, a desktop slot, a dependency done,
failed or cancelled), a desktop online, resumed or registered, an agent resumed."""
SWEEP_SECONDS = 5.0
PAGE = 100
"""Queued tasks read at once, in queue order."""
FULL_PASS = TypeFilter(["task.failed", "task.cancelled"])
"""What may fail a queued run whose dependency it ended: a pass over the whole queue."""


class Dispatcher:
    def __init__(self, log_: EventLog, models: ReadModels, commands: Commands, limit: int,
                 sweep_seconds: float = SWEEP_SECONDS):
        self.log, self.models, self.commands, self.limit = log_, models, commands, limit
        self.sweep_seconds = sweep_seconds
        self._due = asyncio.Event()
        self._full = True
        """The next pass gives the whole queue its turn, not only its head."""
        self._next_deadline: datetime.datetime | None = None
        """The earliest queue deadline the last pass saw: a pass is due then."""
        self._jobs: list[asyncio.Task] = []

    async def start(self) -> None:
        self._due.set()  # a pass at once: runs queued before this node started may start now
        self._jobs = [
            asyncio.create_task(self._follow(self.log.head), name="mc-dispatch-tail"),
            asyncio.create_task(self._dispatching(), name="mc-dispatcher"),
        ]

    async def close(self) -> None:
        await cancelled(self._jobs)
        self._jobs = []

    async def _follow(self, after: int) -> None:
        async with contextlib.aclosing(self.log.tail_pages(after, types=WAKES)) as pages:
            async for events in pages:
                self._full = self._full or any(FULL_PASS(event.type) for event in events)
                self._due.set()

    async def _dispatching(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._wait()):
                    await self._due.wait()
            except TimeoutError:  # the sweep, or a deadline
                self._full = True
            self._due.clear()  # before the pass: what is recorded during it makes another one due
            full, self._full = self._full, False
            try:
                if (await self.models.counters()).tasks["queued"] == 0:
                    self._next_deadline = None  # nothing queued, no deadline left
                    continue  # nothing to dispatch: the admission lock is left to admissions and endings
                async with self.commands.admission():
                    await self.dispatch(full)
            except asyncio.CancelledError:
                raise
            except Exception:  # the log closing, a bad moment: never a busy loop, never the loop's end
                log.exception("dispatch pass failed")
                await asyncio.sleep(1)

    def due_at(self, deadline: str) -> None:
        """A run queued just now fails at `deadline` unless started: a pass is due then, not only at the sweep."""
        at = parse_rfc3339(deadline)
        self._next_deadline = min(self._next_deadline or at, at)
        self._due.set()  # the wait is measured again (the pass it makes is a short one)

    def _wait(self) -> float:
        """Seconds until the next pass is due without a wake-up: the sweep, or a deadline sooner."""
        if self._next_deadline is None:
            return self.sweep_seconds
        left = (self._next_deadline - datetime.datetime.now(datetime.UTC)).total_seconds()
        return max(0.0, min(self.sweep_seconds, left))

    async def dispatch(self, full: bool = True) -> int:
        """One pass over the queue, in queue order; the caller holds `commands.admission()`. A `full`
        pass gives every queued run its turn (a deadline or a failed dependency may end it); one that
        is not stops once no slot is left, and so reads only the head of the queue. Returns how many
        runs it started."""
        running = await self.models.running_count()
        if not full and running >= self.limit:
            return 0
        desktops = await self.models.placements()
        agents: dict[str, Agent | None] = {}
        spent: dict[str, str] = {}
        """Each agent's cost so far, against its budget: read once a pass, as its agent is."""
        statuses: dict[str, str | None] = {}
        now = now_rfc3339()
        started = 0
        deadlines: list[datetime.datetime] = []
        meta = Meta(actor=DISPATCHER_ACTOR)
        after: tuple[int, int] | None = None
        while page := await self.models.queued(after=after, limit=PAGE):
            after = (page[-1].priority, page[-1].queued_position)
            for task in page:
                if not full and running >= self.limit:
                    return started
                if running >= self.limit and task.queue_deadline is None and not task.depends_on:
                    continue  # it can neither start nor end now
                for dep in task.depends_on:
                    if dep not in statuses:
                        found = await self.models.task(dep, with_watchers=False)
                        statuses[dep] = found.status if found else None
                agent_id = task.agent_id or ""
                if agent_id not in agents:
                    agents[agent_id] = await self.models.agent(agent_id)
                    spent[agent_id] = (await self.models.usage(agent_id)).cost_usd
                command = DispatchRun(
                    agent=agents[agent_id], running=running, limit=self.limit,
                    dependencies={dep: statuses[dep] for dep in task.depends_on}, desktops=desktops, now=now,
                    spent_usd=spent[agent_id],
                )
                if not decide(task, command):  # pure, and what most of the queue gets: nothing to record
                    if task.queue_deadline is not None:
                        deadlines.append(parse_rfc3339(task.queue_deadline))
                    continue
                try:
                    decided, recorded = await self.commands.task(task.id, command, meta, known=task)
                except Refused:  # no longer queued (cancelled meanwhile): nothing to do
                    continue
                statuses[task.id] = decided.status
                if recorded and recorded[-1].type == t.TaskStarted.event_type:
                    started += 1
                    running += 1
                    for desktop in desktops:
                        if desktop.id == decided.run_desktop_id:  # type: ignore[attr-defined]  (the fold's TaskState)
                            desktop.busy += 1
        if full:
            self._next_deadline = min(deadlines, default=None)
        return started
