"""The node's own desktop: a worker in the server's process, with no HTTP between.

It registers at startup (all four kinds, capacity `MC_MAX_CONCURRENT`), polls `Reports.poll`
directly (woken by the same tail as a remote worker's poll), runs each assignment in an Executor
whose `DirectReporter` calls the same report handlers, so its runs are placed, leased, fenced
and ended exactly as a remote desktop's. Their working directories and `.pids` records are under
`<data-dir>/runs`, so recovery ends what a previous process left, as before desktops.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from importlib.metadata import version
from pathlib import Path

import structlog

from events import EventLog, Meta, StorageError, WrongExpectedVersion, streams
from events import types as t
from projections.agents import AGENT_KINDS
from projections.artifacts import File
from service.artifacts import file_chunks
from projections.readmodels import ReadModels
from service.commands.deciders import FailRun, Fence, Refused
from service.commands.handling import Commands
from service.ids import new_id
from service.settings import Settings
from service.work import wire
from service.work.agents.process import kill_orphans
from service.work.executor import Executor, LeaseLost, Pacing, write_checked
from service.work.reports import Reports, WorkerIdentity

log = structlog.get_logger("mission_control.local")

ECHO_AGENT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "mission-control:agent:echo"))
NODE_ACTOR = "mission-control:runner"
"""What the node records on its own: the echo agent, and the runs it interrupts."""
INTERRUPTED = "The service stopped while this run was in progress."


async def ensure_echo_agent(log_: EventLog, models: ReadModels) -> None:
    if await models.agent(ECHO_AGENT_ID) is None:
        with contextlib.suppress(WrongExpectedVersion):
            await log_.append(
                streams.agent(ECHO_AGENT_ID),
                [t.AgentRegistered(agent_id=ECHO_AGENT_ID, name="echo", kind="echo")],
                expected=0, meta=Meta(actor=NODE_ACTOR),
            )


async def recover(models: ReadModels, commands: Commands, settings: Settings) -> int:
    """End every run a previous process left in progress on this node's desktop (and runs recorded
    before desktops existed), and whatever processes it left running. Runs on other desktops are
    left to their leases: their workers may well still be at them."""
    stuck = [
        task for task in await models.active_runs()
        if task.run_desktop_id in (None, settings.local_desktop)
    ]
    runs_dir = Path(settings.data_dir) / "runs"
    await asyncio.to_thread(kill_orphans, [task.run_id for task in stuck if task.run_id], runs_dir)
    for task in stuck:
        await _interrupt(commands, task.id, task.run_id or "", None)
    return len(stuck)


async def _interrupt(commands: Commands, task_id: str, run_id: str, fence: Fence | None) -> None:
    with contextlib.suppress(Refused):  # ended meanwhile: nothing to interrupt
        await commands.task(
            task_id, FailRun(run_id=run_id, reason="interrupted", error=INTERRUPTED, fence=fence),
            Meta(actor=NODE_ACTOR),
        )


class DirectReporter:
    """Reports straight to the handlers; a refused lease is `LeaseLost`, as over HTTP."""

    def __init__(self, reports: Reports, who: WorkerIdentity, held: _Held):
        self.reports, self.who, self.held = reports, who, held

    async def output(self, run: wire.Assignment, chunks: list[wire.Chunk]) -> int:
        with _lease_lost():
            ack = await self.reports.output(self.who, run.run_id, run.lease, wire.OutputBatch(chunks=chunks))
        return ack.acked_seq

    async def ask(self, run: wire.Assignment, question: wire.Ask) -> None:
        with _lease_lost():
            await self.reports.ask(self.who, run.run_id, run.lease, question)

    async def finish(self, run: wire.Assignment, ending: wire.Ending) -> str:
        self.held.finishing = True  # no longer listed in polls: its ending is on its way
        with _lease_lost():
            answer = await self.reports.finish(self.who, run.run_id, run.lease, ending, f"end-{run.run_id}")
        return answer.status

    async def fetch(self, run: wire.Assignment, file: File, into: Path) -> None:
        assert self.reports.artifacts is not None  # a node always has its log's store
        await write_checked(self.reports.artifacts.get(file.sha256), file, into)

    async def upload(self, run: wire.Assignment, file: Path, name: str, content_type: str) -> File:
        assert self.reports.artifacts is not None
        with _lease_lost():
            await self.reports.leased(self.who, run.run_id, run.lease)
        stored = await self.reports.artifacts.put(file_chunks(file), self.reports.settings.max_artifact_bytes)
        return File(name=name, sha256=stored.sha256, size=stored.size, content_type=content_type)


@contextlib.contextmanager
def _lease_lost():
    try:
        yield
    except Refused as refused:
        if refused.code in ("lease_lost", "not_found"):
            raise LeaseLost(refused.detail) from None
        raise


class _Held:
    """A run the desktop is executing."""

    def __init__(self, assignment: wire.Assignment):
        self.assignment = assignment
        self.executor: Executor | None = None
        self.job: asyncio.Task | None = None
        self.messages_seen = 0
        self.delivered = asyncio.Condition()
        """Notified as messages reach the executor: a message route may wait for its own."""
        self.finishing = False
        self.gone = asyncio.Event()
        """Set once its executor has returned: its processes are stopped."""


class LocalDesktop:
    def __init__(self, reports: Reports, models: ReadModels, commands: Commands, settings: Settings):
        self.reports, self.models, self.commands, self.settings = reports, models, commands, settings
        self.name = settings.local_desktop
        self.who = WorkerIdentity(desktop_id=self.name, key_id=None)
        self.session_id = new_id()
        self.workdir = Path(settings.data_dir)
        self.epoch = 0
        self.pacing = Pacing()
        self.runs: dict[str, _Held] = {}
        self._freed = asyncio.Event()
        """Set when a run leaves: a poll held with fewer free slots is asked again."""
        self._loop: asyncio.Task | None = None
        self._stopping: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Register a new session (recovery has ended the last one's runs), then poll."""
        await self._register()
        self._loop = asyncio.create_task(self._polling(), name="mc-local-desktop")

    async def _register(self) -> None:
        registered = await self.reports.register(self.who, wire.Register(
            session_id=self.session_id, agents=list(AGENT_KINDS), capacity=self.settings.max_concurrent,
            version=version("mission-control"), hostname=socket.gethostname(),
        ), node=True)
        self.epoch, self.pacing = registered.epoch, Pacing.told(registered)

    async def _polling(self) -> None:
        while True:
            try:
                try:
                    answer = await self._poll()
                except Refused as refused:
                    if refused.code != "not_registered":
                        raise
                    await self._register()  # silent for a lease (a hung loop): the same session comes back
                    continue
            except asyncio.CancelledError:
                raise
            except StorageError as exc:  # the database away: the log reconnects, this polls again
                log.warning("local desktop poll failed: the log's storage failed", desktop=self.name,
                            error=str(exc))
                await asyncio.sleep(1)
                continue
            except Exception:  # the log closing, a bad moment: never a busy loop, never the loop's end
                log.exception("local desktop poll failed", desktop=self.name)
                await asyncio.sleep(1)
                continue
            for ended in answer.ended:
                held = self.runs.get(ended.run_id)
                if held is not None and ended.reason != "finished":
                    stopping = asyncio.create_task(self._cancel(held), name=f"cancel-{ended.run_id}")
                    self._stopping.add(stopping)  # referenced until done, so it is not collected
                    stopping.add_done_callback(self._stopping.discard)
            for delivered in answer.messages:
                held = self.runs.get(delivered.run_id)
                if held is not None and held.executor is not None and delivered.index > held.messages_seen:
                    held.messages_seen = delivered.index
                    held.executor.deliver(delivered.message)
                    async with held.delivered:
                        held.delivered.notify_all()
            for assignment in answer.assignments:
                if assignment.run_id not in self.runs:  # handed out twice: already running
                    self._execute(assignment)

    async def _poll(self) -> wire.PollAnswer:
        listed = [held for held in self.runs.values() if not held.finishing]
        body = wire.Poll(
            epoch=self.epoch, free=max(0, self.settings.max_concurrent - len(self.runs)),
            runs=[wire.HeldRun(run_id=h.assignment.run_id, lease=h.assignment.lease, messages_seen=h.messages_seen)
                  for h in listed],
        )
        self._freed.clear()
        polling = asyncio.ensure_future(self.reports.poll(self.who, body))
        polling.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, if left
        freed = asyncio.ensure_future(self._freed.wait())
        try:
            await asyncio.wait([polling, freed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
            if not polling.done():  # a slot came free while the poll was held (or we stop): ask again
                polling.cancel()
        return polling.result() if polling.done() and not polling.cancelled() else wire.PollAnswer()

    def _execute(self, assignment: wire.Assignment) -> None:
        held = _Held(assignment)
        held.executor = Executor(assignment, self.workdir, DirectReporter(self.reports, self.who, held), self.pacing)
        self.runs[assignment.run_id] = held
        held.job = asyncio.create_task(self._run(held), name=f"run-{assignment.task_id}")

    async def _run(self, held: _Held) -> None:
        try:
            assert held.executor is not None
            await held.executor.run()
        except Exception:
            log.exception("local run failed", run_id=held.assignment.run_id)
        finally:
            self.runs.pop(held.assignment.run_id, None)
            held.gone.set()
            self._freed.set()

    async def _cancel(self, held: _Held) -> None:
        assert held.executor is not None
        await held.executor.cancel()

    async def stopped(self, run_id: str, timeout: float) -> None:
        """Returns once the run's processes are gone (at most `timeout` s): a cancel route's answer
        then promises that they are."""
        held = self.runs.get(run_id)
        if held is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await held.gone.wait()

    async def delivered(self, run_id: str, index: int, timeout: float) -> None:
        """Returns once the run's message `index` is on its agent's queue (at most `timeout` s): a
        message route's 202 then means the agent has it, even if its turn is ending right now."""
        held = self.runs.get(run_id)
        if held is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout), held.delivered:
                    await held.delivered.wait_for(lambda: held.messages_seen >= index or held.gone.is_set())

    async def close(self) -> None:
        """At shutdown: stop every run (their process groups at once) and record each interrupted,
        as the next start's recovery would; then the desktop is offline (`stopped`)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        running = list(self.runs.values())
        await asyncio.gather(*(self._cancel(held) for held in running if held.executor is not None))
        for held in running:
            if held.job is not None:
                held.job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await held.job
            run = held.assignment
            fence = Fence(desktop_id=self.name, epoch=self.epoch)
            await _interrupt(self.commands, run.task_id, run.run_id, fence)
        with contextlib.suppress(Refused):
            await self.reports.leave(self.who, reason="stopped")

