"""The read models' interface: what the API asks of them, in its own words.

A backend (projections/<backend>.py, beside events/<backend>.py) stores the models the
Model table describes and answers these reads. It is paired with a log of its own backend:
its `project_events` is that log's projector, run inside every append's transaction with the
log's transaction handle, so a read model never disagrees with the log it came from. Before
folding new events it catches up on any it has not seen (appended by a process without a
projector, or not yet refolded by a rebuild), by the checkpoint kept in the same transaction.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import msgspec

from events import EventLog, RecordedEvent, Transaction, streams, typed
from projections.agents import Agent
from projections.apikeys import ApiKey
from projections.approvals import Approval
from projections.desktops import Desktop, Placement
from projections.devices import Device
from projections.notifications import Pending
from projections.projects import Project
from projections.usage import Usage, UsageShare, total
from projections.store import (
    AGENTS, APIKEYS, APPROVALS, DESKTOPS, DEVICES, NOTIFICATIONS, PROJECTS, TASKS, Changes, Model, fold,
)
from projections.lifecycle import QUEUED, STATUSES
from projections.tasks import Task, TaskState, evolve

T = TypeVar("T")
TaskOrder = Literal["newest", "queue"]

EVERYTHING = 2**62
"""A position past any head: `until` for reading every event there is."""
PAGE = 5000
"""Events folded at once when catching up or rebuilding."""


class Counters(msgspec.Struct):
    tasks: dict[str, int]
    active_desktops: int
    """Desktops online."""
    active_agents: int
    approvals_pending: int
    streams: int
    checkpoint: int


def read_models(log: EventLog) -> ReadModels:
    """The read models of `log`'s backend, made its projector. `prepare` them before reading."""
    return importlib.import_module(f"projections.{log.backend}").read_models(log)


class ReadModels(ABC):
    def __init__(self, log: EventLog):
        self.log = log
        log.projector = self.project_events
        self._projects_seen: set[str] = set()  # `project_exists`'s yeses

    # --- keeping them: what a backend does inside a transaction of its log -----------------

    @abstractmethod
    async def _transact(self, fn: Callable[[Any], T]) -> T:
        """Run fn(tx) in a write transaction of the log's, serialised with its appends."""

    @abstractmethod
    def _create(self, tx: Any) -> bool:
        """Create the stores of every model, the counters and the checkpoint, if missing; whether a
        model's store was missing."""

    @abstractmethod
    def _drop(self, tx: Any) -> None:
        """Drop every store `_create` makes."""

    @abstractmethod
    def _checkpoint(self, tx: Any) -> int:
        """The position of the last event folded."""

    @abstractmethod
    def _load(self, tx: Any, keys: dict[str, list[str]]) -> dict[str, dict[str, bytes]]:
        """The stored states (JSON) under `keys` of each model's table, by table and key: those
        they have. One round trip, however many tables."""

    @abstractmethod
    def _save(self, tx: Any, changes: Changes) -> None:
        """Write the changes: states kept or removed, counters moved (a counter back at zero
        keeps no row, so the stores do not depend on how events were batched), the checkpoint."""

    def _apply(self, tx: Any, events: list[RecordedEvent]) -> None:
        self._save(tx, fold(events, lambda keys: self._load(tx, keys)))

    def _catch_up(self, tx: Transaction, until: int) -> int:
        """Fold at most a page of what lies between the checkpoint and `until`; the new checkpoint."""
        events = tx.read_events(self._checkpoint(tx), until, PAGE)
        if events:
            self._apply(tx, events)
            return events[-1].position
        return self._checkpoint(tx)

    def project_events(self, tx: Transaction, events: list[RecordedEvent]) -> None:
        """The log's projector."""
        done = self._checkpoint(tx)
        fresh = [e for e in events if e.position > done]
        if not fresh:
            return
        while done < fresh[0].position - 1:
            done = self._catch_up(tx, fresh[0].position - 1)
        self._apply(tx, fresh)

    async def prepare(self) -> None:
        """Create the stores if missing and fold whatever the log holds that they lack. Models
        folded by a release that lacked one of them are rebuilt, once: a model added since (the
        usage kept per agent and project) is folded from the first event, and so is what it adds to
        the others (a task's usage), as if they had always been kept."""
        def create(tx: Transaction) -> None:  # and rebuild in the same transaction: a crash leaves neither
            if self._create(tx) and self._checkpoint(tx) > 0:
                self._refold_all(tx)

        await self._transact(create)
        await self.refold()

    async def refold(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Fold what the log holds past the checkpoint; the new checkpoint."""
        head = await self.log.read_head()
        done = await self._transact(self._checkpoint)
        while done < head:
            done = await self._transact(lambda tx: self._catch_up(tx, head))
            if progress is not None:
                progress(done, head)
        return done

    async def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Drop every read model and refold it from the log, all in one transaction: a server
        running beside it never reads half-built models (its appends wait for the rebuild)."""
        head = await self.log.read_head()
        return await self._transact(lambda tx: self._refold_all(tx, head, progress))

    def _refold_all(self, tx: Transaction, head: int = 0, progress: Callable[[int, int], None] | None = None) -> int:
        self._drop(tx)
        self._create(tx)
        done = 0
        while events := tx.read_events(done, EVERYTHING, PAGE):  # up to the head, and whatever came since
            self._apply(tx, events)
            done = events[-1].position
            if progress is not None:
                progress(done, max(head, done))
        return done

    # --- reads: what the API serves, from the models alone --------------------------------

    @abstractmethod
    async def _get(self, model: Model, key: str) -> Any:
        """A model's state under `key`, or None."""

    @abstractmethod
    async def _task_page(
        self, statuses: list[str] | None, desktop_id: str | None, agent_id: str | None,
        project_ids: list[str] | None, search: str | None, archived: bool | None, limit: int, offset: int,
        sort: TaskOrder,
    ) -> tuple[list[Task], int]:
        """`tasks` without their watchers nor queue positions."""

    @abstractmethod
    async def queued(self, after: tuple[int, int] | None = None, limit: int | None = None) -> list[TaskState]:
        """Queued tasks in queue order: priority (highest first), then first queued first. `after`, a
        (priority, queued position) already read: only the tasks behind it; `limit`: at most that many."""

    @abstractmethod
    async def queue_positions(self, task_ids: list[str]) -> dict[str, int]:
        """The rank in queue order (1 first, among all queued tasks) of each of `task_ids` that is queued."""

    @abstractmethod
    async def watchers(self, task_ids: list[str]) -> dict[str, list[str]]:
        """Devices whose presence has not expired, judged against the clock now."""

    @abstractmethod
    async def _task_and_watchers(self, task_id: str) -> tuple[Task | None, list[str]]:
        """The task and `watchers([task_id])`'s devices for it, in one read: a GET of a task is this."""

    @abstractmethod
    async def approvals(self, status: str | None, projects: list[str] | None) -> list[tuple[Approval, Task]]:
        """Approvals, oldest first, each with its task; only those whose task is in `projects`
        (None: every project)."""

    @abstractmethod
    async def agents(self) -> list[Agent]:
        """Oldest first (by created_at, then id)."""

    @abstractmethod
    async def projects(self) -> list[Project]:
        """Oldest first (by created_at, then id)."""

    @abstractmethod
    async def api_key_by_hash(self, token_hash: str) -> ApiKey | None: ...

    @abstractmethod
    async def api_keys(self) -> list[ApiKey]:
        """Oldest first (by created_at, then id)."""

    @abstractmethod
    async def _counter_values(self) -> tuple[dict[str, int], int]:
        """Every counter by name, and the checkpoint: two reads, whatever the size of the log."""

    async def counters(self) -> Counters:
        """The overview's figures."""
        values, checkpoint = await self._counter_values()
        return Counters(
            tasks={s: values.get(f"tasks.{s}", 0) for s in STATUSES},
            active_desktops=values.get("desktops.online", 0),
            active_agents=values.get("agents.active", 0),
            approvals_pending=values.get("approvals.pending", 0),
            streams=values.get("log.streams", 0),
            checkpoint=checkpoint,
        )

    @abstractmethod
    async def usage_shares(self, agent_id: str | None, project_ids: list[str] | None) -> list[UsageShare]:
        """The usage kept per agent and project: of `agent_id` (None: every agent) over the tasks of
        `project_ids` (None: every project), in no particular order."""

    async def usage(self, agent_id: str | None = None, project_ids: list[str] | None = None) -> Usage:
        """Summed over the runs of `agent_id` (None: any agent) on the tasks of `project_ids` (None: all)."""
        return total(share.usage for share in await self.usage_shares(agent_id, project_ids))

    async def usage_by_agent(self, project_ids: list[str] | None = None) -> dict[str, Usage]:
        """Each agent's usage over the tasks of `project_ids` (None: all); agents with none left out."""
        shares: dict[str, list[Usage]] = {}
        for share in await self.usage_shares(None, project_ids):
            shares.setdefault(share.agent_id, []).append(share.usage)
        return {agent_id: total(usages) for agent_id, usages in shares.items()}

    @abstractmethod
    async def running_count(self) -> int:
        """Tasks holding a run slot (an ACTIVE status)."""

    @abstractmethod
    async def desktops(self) -> list[Desktop]:
        """Every desktop not removed, by name."""

    @abstractmethod
    async def active_runs(self, desktop_id: str | None = None) -> list[TaskState]:
        """Tasks holding a run slot whose current run is placed on `desktop_id` (None: on any
        desktop), oldest placement first."""

    @abstractmethod
    async def pending_notifications(self, cause_position: int | None = None) -> list[Pending]:
        """Notifications decided and not yet concluded, by their cause's position (then id); only
        those of the cause at `cause_position` when given."""

    async def pending_notification(self, delivery_id: str) -> Pending | None:
        return await self._get(NOTIFICATIONS, delivery_id)

    async def devices(self, user_id: str) -> list[Device]:
        """The user's devices, in the order they were first registered."""
        found = await self._get(DEVICES, user_id)
        return list(found.devices.values()) if found is not None else []

    async def desktop(self, desktop_id: str) -> Desktop | None:
        return await self._get(DESKTOPS, desktop_id)

    async def busy_by_desktop(self) -> dict[str, int]:
        """How many runs each desktop has (only desktops with one)."""
        busy: dict[str, int] = {}
        for task in await self.active_runs():
            if task.run_desktop_id is not None:
                busy[task.run_desktop_id] = busy.get(task.run_desktop_id, 0) + 1
        return busy

    async def placements(self) -> list[Placement]:
        """Every desktop as placement sees it: what `StartRun.desktops` takes."""
        busy = await self.busy_by_desktop()
        return [
            Placement(id=d.id, status=d.status, agents=list(d.agents), capacity=d.capacity,
                      busy=busy.get(d.id, 0), epoch=d.epoch)
            for d in await self.desktops()
        ]

    async def task(self, task_id: str, *, with_watchers: bool = True) -> Task | None:
        """The task; its `watchers` and queue position (more reads) only for answers that show them."""
        if not with_watchers:
            return await self._get(TASKS, task_id)
        found, watchers = await self._task_and_watchers(task_id)
        if found is not None:
            found.watchers = watchers
            await self.place_in_queue([found])
        return found

    async def place_in_queue(self, tasks: list[Task]) -> None:
        """Sets the `queue_position` of each queued task among `tasks` (one read, if any is queued)."""
        queued = [task.id for task in tasks if task.status == QUEUED]
        positions = await self.queue_positions(queued) if queued else {}
        for task in tasks:
            task.queue_position = positions.get(task.id)

    async def task_as_of(self, task_id: str, position: int) -> Task | None:
        """The task as it stood at a log position, folded from its own events."""
        state: Task | None = None
        for recorded in await self.log.read_stream(streams.task(task_id), until_position=position):
            state = evolve(state, typed(recorded))
        return state

    async def tasks(
        self,
        *,
        statuses: list[str] | None = None,
        desktop_id: str | None = None,
        agent_id: str | None = None,
        project_ids: list[str] | None = None,
        search: str | None = None,
        archived: bool | None = False,
        limit: int = 50,
        offset: int = 0,
        sort: TaskOrder = "newest",
    ) -> tuple[list[Task], int]:
        """Newest first (`sort="queue"`: queued tasks first, in queue order, then the others newest
        first), and the total that matches. `project_ids` None means every project; `search` matches
        title or content, literally; `archived` None means either."""
        found, total = await self._task_page(
            statuses, desktop_id, agent_id, project_ids, search, archived, limit, offset, sort
        )
        live = await self.watchers([t.id for t in found])
        for t in found:
            t.watchers = live.get(t.id, [])
        await self.place_in_queue(found)
        return found, total

    async def approval(self, approval_id: str) -> Approval | None:
        return await self._get(APPROVALS, approval_id)

    async def agent(self, agent_id: str) -> Agent | None:
        return await self._get(AGENTS, agent_id)

    async def project(self, project_id: str) -> Project | None:
        return await self._get(PROJECTS, project_id)

    async def project_exists(self, project_id: str) -> bool:
        """Whether the project exists. No event removes a project, so a yes is remembered and a
        task created in a known one (as most are: in their user's default project) reads nothing."""
        if project_id in self._projects_seen:
            return True
        if await self.project(project_id) is None:
            return False
        if len(self._projects_seen) >= 10_000:
            self._projects_seen.clear()
        self._projects_seen.add(project_id)
        return True

    async def api_key(self, key_id: str) -> ApiKey | None:
        return await self._get(APIKEYS, key_id)
