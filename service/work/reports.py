"""The worker service: what a desktop's worker says to the server, without the transport.

The HTTP routes (service/api/worker.py) authenticate a key, decode the wire message and call these;
the node's own desktop (service/work/local.py) calls them directly. Every report on a run is
fenced (the run is current, placed on the caller's desktop, under the lease's epoch, which is the
desktop's current one) and decided by the task's decider, so a worker presumed dead records
nothing; an accepted report renews the run's lease. Each event a report causes names as its
`causationId` the run's `task.started` (its log position as a string: a run's id is no event id),
and as its actor the desktop's worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from decimal import Decimal

import msgspec

from events import EventLog, Meta, RecordedEvent, TypeFilter, canonical_json, decode, streams, typed
from events import types as t
from projections import artifacts, usage
from projections.agents import Agent
from projections.artifacts import File
from projections.desktops import Desktop
from projections.readmodels import ReadModels
from projections.tasks import Task, TaskState
from service.artifacts import ArtifactStore, name_problem
from service.commands.deciders import FailRun, Fence, FinishRun, RecordOutput, Refused, RequestInput, fenced
from service.commands.desktops import Drain, MarkOffline, Register
from service.commands.handling import Commands, Idempotency
from service.ids import new_id
from service.settings import Settings
from service.work import wire
from service.work.leases import ENDINGS, LeaseStore, lapsed, lose

CHUNK_BYTES = 16 * 1024
FLUSH_MILLISECONDS = 50
MAX_BATCH_CHUNKS = 64
KNOWN_RUNS = 10_000
"""Runs remembered (to their task and desktop) after they end, so a late report on one is told
`lease_lost` rather than `not_found`."""
WAKES = TypeFilter(["task.started", "task.message", *ENDINGS, "desktop."])
"""What may make a held poll due."""


class WorkerIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling: the desktop its key is for (never one it chose), and that key."""

    desktop_id: str
    key_id: str | None = None


def worker_actor(desktop_id: str) -> str:
    return f"desktop:{desktop_id}"


def compose_prompt(context: str | None, dependencies: list[Task], task: Task) -> str:
    """API.md's order: project context, each dependency's deliverable, title, description, content."""
    parts = [context or ""]
    parts += [dep.result or "" for dep in dependencies]
    parts += [task.title or "", task.description or "", task.content]
    return "\n\n".join(p for p in parts if p)


class _Waiter:
    """A held poll: the desktop and the runs it lists, and what wakes it."""

    def __init__(self, desktop_id: str, runs: set[str]):
        self.desktop_id, self.runs = desktop_id, runs
        self.woken = asyncio.Event()
        self.desktop_changed = False


class Reports:
    def __init__(
        self, log_: EventLog, models: ReadModels, commands: Commands, leases: LeaseStore, settings: Settings,
        clock: Callable[[], float] = time.monotonic, artifacts: ArtifactStore | None = None,
    ):
        self.log, self.models, self.commands, self.leases = log_, models, commands, leases
        self.artifacts = artifacts
        """Where a run's outputs were uploaded: an ending naming one it does not hold is refused."""
        self.settings = settings
        self.clock = clock
        self.lease_seconds = settings.lease_seconds
        self.poll_seconds = min(20.0, settings.lease_seconds / 3)
        self._waiters: set[_Waiter] = set()
        self._known: OrderedDict[str, tuple[str, str]] = OrderedDict()
        """Runs handed out or reported on: run id -> (task id, desktop id)."""
        self._follower: asyncio.Task | None = None
        self._closed = False

    # --- lifetime -------------------------------------------------------------------------------

    def start(self) -> None:
        self._follower = asyncio.create_task(self._follow(self.log.head), name="mc-poll-wakeups")

    async def close(self) -> None:
        """Held polls answer at once (empty); new ones too, until the log refuses them."""
        self._closed = True
        for waiter in self._waiters:
            waiter.woken.set()
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower

    async def _follow(self, after: int) -> None:
        async with contextlib.aclosing(self.log.tail(after, types=WAKES)) as events:
            async for event in events:
                if self._waiters:
                    self._wake(event)

    def _wake(self, event: RecordedEvent) -> None:
        data = decode(event)
        for waiter in list(self._waiters):
            if event.type.startswith("desktop."):
                if data.desktop_id == waiter.desktop_id:  # type: ignore[attr-defined]
                    waiter.desktop_changed = True
                    waiter.woken.set()
            elif isinstance(data, t.TaskStarted):
                if data.desktop_id == waiter.desktop_id:
                    waiter.woken.set()
            elif getattr(data, "run_id", None) in waiter.runs:
                waiter.woken.set()

    # --- the desktop ------------------------------------------------------------------------------

    async def register(self, who: WorkerIdentity, body: wire.Register, *, node: bool = False) -> wire.Registered:
        """Idempotent per session: a new one moves the epoch on and loses the runs of older ones; the
        same one back from offline is online again; otherwise nothing is recorded."""
        command = Register(
            session_id=body.session_id, agents=body.agents, capacity=body.capacity, version=body.version,
            hostname=body.hostname, key_id=who.key_id, node=node,
        )
        desktop, recorded = await self.commands.desktop(who.desktop_id, command, self._meta(who.desktop_id))
        assert desktop is not None  # a registration never removes
        await self.leases.heard(desktop.id)
        if any(event.type == "desktop.registered" for event in recorded):
            for task in await self.models.active_runs(desktop.id):
                if task.lease_epoch != desktop.epoch:
                    await lose(self.commands, task, f"The worker on desktop {desktop.id} restarted; this run was "
                               "its previous session's.")
        return wire.Registered(
            desktop=msgspec.to_builtins(desktop), epoch=desktop.epoch, lease_seconds=self.lease_seconds,
            poll_seconds=self.poll_seconds, chunk_bytes=CHUNK_BYTES, flush_milliseconds=FLUSH_MILLISECONDS,
            max_batch_chunks=MAX_BATCH_CHUNKS,
        )

    async def drain(self, who: WorkerIdentity) -> Desktop:
        """The worker's own drain (its SIGTERM): it takes nothing new and finishes what it has."""
        desktop, _ = await self.commands.desktop(who.desktop_id, Drain(by="worker"), self._meta(who.desktop_id))
        if desktop is None:
            raise Refused("not_found", f"Desktop {who.desktop_id} is not registered.")
        await self.leases.heard(desktop.id)
        return desktop

    async def leave(self, who: WorkerIdentity, reason: t.DesktopOfflineReason = "left") -> None:
        """The worker says goodbye (`stopped`: the node's own desktop, as its node shuts down)."""
        desktop = await self.models.desktop(who.desktop_id)
        if desktop is None:
            raise Refused("not_found", f"Desktop {who.desktop_id} is not registered.")
        await self.commands.desktop(
            desktop.id, MarkOffline(reason=reason, epoch=desktop.epoch), self._meta(desktop.id)
        )

    async def _registered(self, who: WorkerIdentity, epoch: int) -> Desktop:
        desktop = await self._desktop(who)
        if desktop is None or desktop.status == "offline" or desktop.epoch != epoch:
            state = "not registered" if desktop is None else (
                "offline" if desktop.status == "offline" else f"at epoch {desktop.epoch}, not {epoch}")
            raise Refused("not_registered", f"Desktop {who.desktop_id} is {state}; register again.")
        return desktop

    async def _desktop(self, who: WorkerIdentity) -> Desktop | None:
        """The caller's desktop; a worker key never acts as a node's own (whose epoch is no secret)."""
        desktop = await self.models.desktop(who.desktop_id)
        if desktop is not None and desktop.node and who.key_id is not None:
            raise Refused("invalid_status", f"Desktop {desktop.id} is a node's own desktop; a worker cannot act as it.")
        return desktop

    # --- the poll ---------------------------------------------------------------------------------

    async def poll(self, who: WorkerIdentity, body: wire.Poll) -> wire.PollAnswer:
        """Answers at once if anything is due, else when the tail makes something due, or empty after
        `poll_seconds`. Arriving, it marks the desktop heard from and renews the listed runs' leases."""
        desktop = await self._registered(who, body.epoch)
        now = self.clock()
        held = {run.run_id: run for run in body.runs}
        await self.leases.renew(desktop.id, list(held), self.lease_seconds)  # a lapsed one is not revived: lost below
        waiter = _Waiter(desktop.id, set(held))
        self._waiters.add(waiter)
        try:
            expiry = now + self.poll_seconds
            while True:
                waiter.woken.clear()  # before reading what is due: a wake-up during the reads is kept
                answer = await self._due(desktop, body, held)
                remaining = expiry - self.clock()
                if answer.assignments or answer.ended or answer.messages or remaining <= 0 or self._closed:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await waiter.woken.wait()
                if waiter.desktop_changed:  # drained, resumed, a new session, offline: answer now
                    desktop = await self._registered(who, body.epoch)
                    answer = await self._due(desktop, body, held)
                    break
        finally:
            self._waiters.discard(waiter)
        await self.leases.heard(desktop.id)
        return answer

    async def _due(self, desktop: Desktop, body: wire.Poll, held: dict[str, wire.HeldRun]) -> wire.PollAnswer:
        active = await self.models.active_runs(desktop.id)
        mine = {task.run_id: task for task in active if task.lease_epoch == desktop.epoch}
        answer = wire.PollAnswer(drain=desktop.status == "draining")
        lapses = {lapse.run_id: lapse for lapse in await self.leases.lapsed(list(held))}
        for run_id, run in held.items():
            task = mine.get(run_id)
            if task is not None and run_id in lapses:
                await self._lose_lapsed(task, lapses[run_id].deadline)
                task = None
            if task is None:
                answer.ended.append(wire.Ended(run_id=run_id, reason=await self._why_ended(run_id, desktop)))
            elif task.messages > run.messages_seen:
                answer.messages += await self._messages(task, run.messages_seen)
        for task in active:
            if len(answer.assignments) >= body.free:
                break
            if task.run_id in held or task.run_id not in mine:
                continue
            assignment = await self._assignment(task, desktop)
            if assignment is not None:
                await self.leases.grant(assignment.run_id, task.id, self.lease_seconds)  # a fresh lease to start on
                answer.assignments.append(assignment)
        return answer

    async def _why_ended(self, run_id: str, desktop: Desktop) -> wire.EndedReason:
        known = self._known.get(run_id)
        task = await self.models.task(known[0], with_watchers=False) if known else None
        if task is None:
            return "lost"
        if task.run_id != run_id or task.lease_epoch != desktop.epoch:
            return "superseded"
        if task.status == "cancelled":
            return "cancelled"
        if task.status != "failed":
            return "finished"
        last = await self.log.last_event(streams.task(task.id))
        ended_by_worker = last is not None and typed(last).actor == worker_actor(desktop.id)
        return "finished" if ended_by_worker else "lost"

    async def _messages(self, task: TaskState, seen: int) -> list[wire.Delivered]:
        """The current run's messages after the first `seen`, numbered from 1 in order."""
        recorded = await self.log.read_stream(streams.task(task.id), types=TypeFilter(["task.message"]))
        mine = [m for m in map(decode, recorded) if isinstance(m, t.TaskMessage) and m.run_id == task.run_id]
        return [
            wire.Delivered(run_id=task.run_id or "", index=index, message=m.message)
            for index, m in enumerate(mine, 1) if index > seen
        ]

    async def _assignment(self, task: TaskState, desktop: Desktop) -> wire.Assignment | None:
        agent = await self.models.agent(task.agent_id or "")
        if agent is None:  # agents are never deleted: not reached
            return None
        project = await self.models.project(task.project_id)
        dependencies = [d for d in [await self.models.task(i, with_watchers=False) for i in task.depends_on] if d]
        run_id = task.run_id or ""
        self._remember(run_id, task.id, desktop.id)
        return wire.Assignment(
            run_id=run_id, lease=wire.lease_token(run_id, task.lease_epoch), task_id=task.id, number=task.runs,
            task=wire.TaskBrief(
                type=task.type, content=task.content, title=task.title, description=task.description,
                metadata=task.metadata, timeout_seconds=task.timeout_seconds,
            ),
            agent=wire.AgentBrief(id=agent.id, name=agent.name, kind=agent.kind, config=agent.config),
            prompt=compose_prompt(project.context if project else None, dependencies, task),
            timeout_seconds=task.timeout_seconds or self.settings.default_timeout_seconds,
            lease_seconds=self.lease_seconds, budget_left_usd=await self._budget_left(agent),
            inputs=await self._inputs(task),
        )

    async def _budget_left(self, agent: Agent) -> str | None:
        cap = usage.budget(agent.config)
        if cap is None:
            return None
        spent = Decimal((await self.models.usage(agent.id)).cost_usd)
        return usage.text(max(Decimal(0), usage.EXACT.subtract(cap, spent)))

    async def _inputs(self, task: TaskState) -> list[File]:
        """The files the run consumed as it started (recorded with its `task.started`)."""
        recorded = await self.log.read_stream(streams.task(task.id), types=TypeFilter(["artifact.recorded"]))
        return [
            artifacts.file_of(data) for data in map(decode, recorded)
            if isinstance(data, t.ArtifactRecorded) and data.run_id == task.run_id and data.direction == "input"
        ]

    def _remember(self, run_id: str, task_id: str, desktop_id: str) -> None:
        self._known[run_id] = (task_id, desktop_id)
        self._known.move_to_end(run_id)
        while len(self._known) > KNOWN_RUNS:
            self._known.popitem(last=False)

    # --- reports on a run -------------------------------------------------------------------------

    async def output(self, who: WorkerIdentity, run_id: str, lease: str, body: wire.OutputBatch) -> wire.OutputAck:
        """Chunks with a seq already recorded are skipped; the rest must continue without a gap
        (OutputGap otherwise, nothing recorded). One append; the seq now recorded."""
        task, fence = await self._leased(who, run_id, lease)
        command = RecordOutput(run_id=run_id, chunks=_chunks(body.chunks), fence=fence)
        updated, _ = await self.commands.task(task.id, command, self._caused(who, task), known=task)
        await self._renew(who, run_id)
        return wire.OutputAck(acked_seq=updated.output_seq)  # type: ignore[attr-defined]

    async def ask(self, who: WorkerIdentity, run_id: str, lease: str, body: wire.Ask) -> wire.RunStatus:
        task, fence = await self._leased(who, run_id, lease)
        command = RequestInput(
            run_id=run_id, prompt=body.prompt, fence=fence, number=body.number, after_seq=body.after_seq,
        )
        updated, _ = await self.commands.task(task.id, command, self._caused(who, task), known=task)
        await self._renew(who, run_id)
        return wire.RunStatus(status=updated.status)

    async def finish(
        self, who: WorkerIdentity, run_id: str, lease: str, body: wire.Ending, idempotency_key: str | None,
    ) -> wire.RunStatus:
        """The ending, with the output not yet acknowledged, in one append. Under an idempotency key
        (`end-<runId>`), a resend answers what the first one did and records nothing, even once the
        run is over or the server has restarted."""
        idem = None
        if idempotency_key is not None:
            fingerprint = hashlib.sha256(
                f"finish {run_id}\0".encode() + canonical_json(msgspec.to_builtins(body))
            ).hexdigest()
            idem = Idempotency(f"{worker_actor(who.desktop_id)}\0{idempotency_key}", fingerprint)
            earlier = await self.commands.replay(idem)
            if earlier is not None:
                return wire.RunStatus(status=earlier.status)
        task, fence = await self._leased(who, run_id, lease)
        output = _chunks(body.output)
        outputs = await self._outputs(run_id, body)
        used = None
        if body.usage is not None:  # priced now, with the agent's prices as they stand, and kept so
            agent = await self.models.agent(task.agent_id or "")
            used = usage.priced(body.usage, agent.config if agent else {})
        command: FinishRun | FailRun
        if body.outcome == "done":
            command = FinishRun(
                run_id=run_id, approval_id=new_id(), result=body.result, fence=fence,
                last_seq=body.last_seq, output=output, usage=used, artifacts=outputs,
            )
        else:
            command = FailRun(
                run_id=run_id, reason=body.reason or "error", error=body.error or "The run failed.", fence=fence,
                last_seq=body.last_seq, exit_code=body.exit_code, result=body.result, output=output, usage=used,
                artifacts=outputs,
            )
        updated, _ = await self.commands.task(task.id, command, self._caused(who, task), idem, known=task)
        await self.leases.heard(who.desktop_id)  # its lease is dropped by the keepers, which follow every ending
        return wire.RunStatus(status=updated.status)

    async def _outputs(self, run_id: str, body: wire.Ending) -> list[File]:
        """The files an ending names, each uploaded already (`PUT /worker/runs/{runId}/artifacts/{name}`)."""
        try:
            files = msgspec.convert(body.artifacts, list[File])
        except msgspec.ValidationError as exc:
            raise Refused("artifact_missing", f"The ending of run {run_id} names its artifacts wrongly: {exc}.") from None
        for f in files:
            problem = name_problem(f.name)
            if problem is not None:
                raise Refused("artifact_missing", problem)
            if self.artifacts is None or not await self.artifacts.has(f.sha256):
                raise Refused("artifact_missing", f"Output {f.name!r} of run {run_id} ({f.sha256}) was never "
                              "uploaded; PUT it to /worker/runs/{runId}/artifacts/{name} before the ending.")
        return files

    async def leased(self, who: WorkerIdentity, run_id: str, lease: str) -> TaskState:
        """The run's task, while the caller holds the run's lease and the run may still report (an
        artifact's transfer); renews the lease, as any report does."""
        task, fence = await self._leased(who, run_id, lease)
        fenced(task, run_id, fence, "output")
        await self._renew(who, run_id)
        return task

    async def _leased(self, who: WorkerIdentity, run_id: str, lease: str) -> tuple[TaskState, Fence]:
        """The run's task and the fence its report is decided under; refused when the run is not
        this desktop's (not_found) or its lease is lost: another session's, or lapsed (which is then
        recorded, once, before the refusal)."""
        parsed = wire.parse_lease(lease)
        if parsed is None or parsed[0] != run_id:
            raise Refused("lease_lost", f"{lease[:80]!r} is not the lease of run {run_id}.")
        epoch = parsed[1]
        task = await self._task_of(who.desktop_id, run_id)
        desktop = await self._desktop(who)
        if desktop is None or desktop.epoch != epoch:
            current = "no session" if desktop is None else f"epoch {desktop.epoch}"
            raise Refused(
                "lease_lost", f"The lease of run {run_id} is of epoch {epoch} of desktop {who.desktop_id}, which is "
                f"at {current} now: a newer worker session superseded it.",
            )
        lapse = await self.leases.lapsed([run_id]) if task.run_id == run_id else []
        if lapse:
            await self._lose_lapsed(task, lapse[0].deadline)
            raise Refused("lease_lost", lapsed(who.desktop_id, lapse[0].deadline))
        return task, Fence(desktop_id=who.desktop_id, epoch=epoch)

    async def _task_of(self, desktop_id: str, run_id: str) -> TaskState:
        known = self._known.get(run_id)
        task = None
        if known is not None:
            task = await self.models.task(known[0], with_watchers=False)
        else:  # handed out before a restart, or by another node
            task = next((t for t in await self.models.active_runs(desktop_id) if t.run_id == run_id), None)
            if task is not None:
                self._remember(run_id, task.id, desktop_id)
        if task is None or (known or (task.id, desktop_id))[1] != desktop_id:
            raise Refused("not_found", f"Run {run_id} is not placed on desktop {desktop_id}.")
        return task  # type: ignore[return-value]

    async def _lose_lapsed(self, task: TaskState, deadline: datetime.datetime) -> None:
        """A lapse no keeper has handled yet: decided here, once, by whoever sees it first."""
        await lose(self.commands, task, lapsed(task.run_desktop_id or "(unnamed)", deadline))

    async def _renew(self, who: WorkerIdentity, run_id: str) -> None:
        await self.leases.renew(who.desktop_id, [run_id], self.lease_seconds)

    def _meta(self, desktop_id: str) -> Meta:
        return Meta(actor=worker_actor(desktop_id))

    def _caused(self, who: WorkerIdentity, task: TaskState) -> Meta:
        return Meta(actor=worker_actor(who.desktop_id), causation_id=str(task.placed_position))


def _chunks(chunks: list[wire.Chunk]) -> list[tuple[int, str, str]]:
    return [(c.seq, c.stream, c.chunk) for c in chunks]
