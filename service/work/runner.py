"""The runner: executes started runs in this process, each in an Executor, and records every
way a run can end.

Its reporter only proposes; each output, question, finish or failure goes through the task's
decider like any command, so a run that was cancelled meanwhile records nothing (and the executor
stops it). The node's own desktop (service/work/local.py) takes its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

from events import EventLog, Meta
from projections.agents import Agent
from projections.lifecycle import ACTIVE
from projections.readmodels import ReadModels
from projections.tasks import Task
from service.commands.deciders import Command, FailRun, FinishRun, RecordOutput, RequestInput, RunOver
from service.commands.handling import Commands
from service.settings import Settings
from service.work import wire
from service.work.agents.process import kill_orphans
from service.work.executor import Executor, LeaseLost, runs_dir

ECHO_AGENT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "mission-control:agent:echo"))
RUNNER_ACTOR = "mission-control:runner"
INTERRUPTED = "The service stopped while this run was in progress."


def compose_prompt(context: str | None, dependencies: list[Task], task: Task) -> str:
    """API.md's order: project context, each dependency's deliverable, title, description, content."""
    parts = [context or ""]
    parts += [dep.result or "" for dep in dependencies]
    parts += [task.title or "", task.description or "", task.content]
    return "\n\n".join(p for p in parts if p)


class Runner:
    def __init__(self, log_: EventLog, models: ReadModels, commands: Commands, settings: Settings):
        self.log = log_
        self.models = models
        self.commands = commands
        self.settings = settings
        self.runs: dict[str, _Launched] = {}

    async def recover(self) -> int:
        """End every run a previous process left in progress, and whatever processes it left
        running: nothing stays running forever."""
        stuck, _ = await self.models.tasks(statuses=sorted(ACTIVE), archived=None, limit=1_000_000)
        runs = runs_dir(Path(self.settings.data_dir))
        await asyncio.to_thread(kill_orphans, [task.run_id for task in stuck if task.run_id], runs)
        for task in stuck:
            await self._record(task.id, FailRun(run_id=task.run_id or "", reason="interrupted", error=INTERRUPTED))
        return len(stuck)

    def launch(self, task: Task, agent: Agent) -> None:
        launched = _Launched(task.run_id or "")
        launched.job = asyncio.create_task(self._drive(task, agent, launched), name=f"run-{task.id}")
        self.runs[task.id] = launched

    def deliver(self, task_id: str, message: str) -> None:
        launched = self.runs.get(task_id)
        if launched is not None:
            if launched.executor is not None:
                launched.executor.deliver(message)
            else:
                launched.early.append(message)

    async def stop(self, task_id: str, run_id: str) -> None:
        """Stop that run of the task, if it is still going (never a later run of it)."""
        launched = self.runs.get(task_id)
        if launched is not None and launched.run_id == run_id:
            del self.runs[task_id]
            if launched.executor is not None:
                await launched.executor.cancel()
            assert launched.job is not None
            launched.job.cancel()  # before its executor existed, or while it reported
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await launched.job

    async def close(self) -> None:
        """At shutdown: stop every run (their process groups at once) and record each as
        interrupted, as the next start's recovery would."""
        stopping = {task_id: launched.run_id for task_id, launched in self.runs.items()}
        await asyncio.gather(*(self.stop(task_id, run_id) for task_id, run_id in stopping.items()))
        for task_id, run_id in stopping.items():
            await self._record(task_id, FailRun(run_id=run_id, reason="interrupted", error=INTERRUPTED))

    async def _record(self, task_id: str, command: Command) -> bool:
        try:
            await self.commands.task(task_id, command, Meta(actor=RUNNER_ACTOR))
            return True
        except RunOver:
            return False

    async def _assignment(self, task: Task, agent: Agent) -> wire.Assignment:
        project = await self.models.project(task.project_id)
        dependencies = [d for d in [await self.models.task(i, with_watchers=False) for i in task.depends_on] if d]
        run_id = task.run_id or ""
        return wire.Assignment(
            run_id=run_id, lease=wire.lease_token(run_id, 0), task_id=task.id, number=task.runs,
            task=wire.TaskBrief(
                type=task.type, content=task.content, title=task.title, description=task.description,
                metadata=task.metadata, timeout_seconds=task.timeout_seconds,
            ),
            agent=wire.AgentBrief(id=agent.id, name=agent.name, kind=agent.kind, config=agent.config),
            prompt=compose_prompt(project.context if project else None, dependencies, task),
            timeout_seconds=task.timeout_seconds or self.settings.default_timeout_seconds, lease_seconds=0,
        )

    async def _drive(self, task: Task, agent: Agent, launched: _Launched) -> None:
        try:
            executor = Executor(await self._assignment(task, agent), Path(self.settings.data_dir), _Recorder(self.commands))
            for message in launched.early:
                executor.deliver(message)
            launched.executor = executor
            await executor.run()
        finally:
            if self.runs.get(task.id) is launched:
                del self.runs[task.id]


class _Launched:
    """A run this node executes: its job, and its executor once the assignment is built."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.job: asyncio.Task | None = None
        self.executor: Executor | None = None
        self.early: list[str] = []
        """Messages that came before the executor did."""


class _Recorder:
    """Reports a run through the task's decider, in this process. A report on a run that ended
    meanwhile (cancelled) records nothing: to the executor, its lease is lost."""

    def __init__(self, commands: Commands):
        self.commands = commands

    async def output(self, run: wire.Assignment, chunks: list[wire.Chunk]) -> int:
        await self._record(run, RecordOutput(run_id=run.run_id, chunks=_chunks(chunks)))
        return chunks[-1].seq

    async def ask(self, run: wire.Assignment, question: wire.Ask) -> None:
        await self._record(run, RequestInput(
            run_id=run.run_id, prompt=question.prompt, number=question.number, after_seq=question.after_seq,
        ))

    async def finish(self, run: wire.Assignment, ending: wire.Ending) -> str:
        command: Command
        if ending.outcome == "done":
            command = FinishRun(
                run_id=run.run_id, approval_id=str(uuid.uuid4()), result=ending.result,
                output=_chunks(ending.output), last_seq=ending.last_seq,
            )
        else:
            command = FailRun(
                run_id=run.run_id, reason=ending.reason or "error", error=ending.error or "",
                exit_code=ending.exit_code, result=ending.result, output=_chunks(ending.output),
                last_seq=ending.last_seq,
            )
        return (await self._record(run, command)).status

    async def _record(self, run: wire.Assignment, command: Command) -> Task:
        try:
            task, _ = await self.commands.task(run.task_id, command, Meta(actor=RUNNER_ACTOR))
        except RunOver as over:
            raise LeaseLost(over.detail) from None
        return task


def _chunks(chunks: list[wire.Chunk]) -> list[tuple[int, str, str]]:
    return [(c.seq, c.stream, c.chunk) for c in chunks]
