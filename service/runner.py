"""The runner: executes started runs on their agents and records every way a run can end.

The runner only proposes; each output, question, finish or failure goes through the
task's decider like any command, so a run that was cancelled meanwhile records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import structlog

from events import EventLog, Meta
from projections import queries
from projections.agents import Agent
from projections.tasks import ACTIVE, Task
from service.agents import AgentFunction, RunContext, RunFailed, echo
from service.commands import Commands
from service.deciders import Command, FailRun, FinishRun, RecordOutput, Rejected, RequestInput
from service.settings import Settings

log = structlog.get_logger("mission_control.runner")

AGENTS: dict[str, AgentFunction] = {"echo": echo.run}
ECHO_AGENT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "mission-control:agent:echo"))
RUNNER_ACTOR = "mission-control:runner"
CHUNK_BYTES = 16 * 1024
FLUSH_SECONDS = 0.05
RESULT_LIMIT = 64 * 1024


def compose_prompt(context: str | None, dependencies: list[Task], task: Task) -> str:
    """API.md's order: project context, each dependency's deliverable, title, description, content."""
    parts = [context or ""]
    parts += [dep.result or "" for dep in dependencies]
    parts += [task.title or "", task.description or "", task.content]
    return "\n\n".join(p for p in parts if p)


class _Output:
    """Coalesces a run's output: one event per 50 ms or 16 KiB at most, order kept."""

    def __init__(self, record):
        self._record = record
        self._pending: list[tuple[str, list[str]]] = []
        self._size = 0
        self._seq = 0
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task | None = None

    async def emit(self, stream: str, text: str) -> None:
        if not text:
            return
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1].append(text)
        else:
            self._pending.append((stream, [text]))
        self._size += len(text)
        if self._size >= CHUNK_BYTES:
            await self.flush()  # the producer waits: a chatty run cannot outrun the log
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        self._flushing = asyncio.create_task(self.flush())

    async def flush(self) -> None:
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            pending, self._pending, self._size = self._pending, [], 0
            chunks = []
            for stream, parts in pending:
                text = "".join(parts)
                for start in range(0, len(text), CHUNK_BYTES):
                    self._seq += 1
                    chunks.append((self._seq, stream, text[start : start + CHUNK_BYTES]))
            if chunks:
                await self._record(chunks)

    async def close(self) -> None:
        await self.flush()
        if self._flushing is not None:
            await self._flushing


class Runner:
    def __init__(self, log_: EventLog, commands: Commands, settings: Settings):
        self.log = log_
        self.commands = commands
        self.settings = settings
        self.runs: dict[str, tuple[str, asyncio.Task, asyncio.Queue]] = {}

    async def recover(self) -> int:
        """End every run a previous process left in progress: nothing stays running forever."""
        stuck, _ = await queries.tasks(self.log, statuses=sorted(ACTIVE), archived=None, limit=1_000_000)
        for task in stuck:
            await self._record(task.id, FailRun(
                run_id=task.run_id or "", reason="interrupted",
                error="The service stopped while this run was in progress.",
            ))
        return len(stuck)

    def launch(self, task: Task, agent: Agent) -> None:
        messages: asyncio.Queue = asyncio.Queue()
        run_id = task.run_id or ""
        job = asyncio.create_task(self._drive(task, agent, messages), name=f"run-{task.id}")
        self.runs[task.id] = (run_id, job, messages)

    def deliver(self, task_id: str, message: str) -> None:
        run = self.runs.get(task_id)
        if run is not None:
            run[2].put_nowait(message)

    async def stop(self, task_id: str) -> None:
        run = self.runs.pop(task_id, None)
        if run is not None:
            run[1].cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run[1]

    async def close(self) -> None:
        for task_id in list(self.runs):
            await self.stop(task_id)

    async def _record(self, task_id: str, command: Command) -> bool:
        try:
            await self.commands.task(task_id, command, Meta(actor=RUNNER_ACTOR))
            return True
        except Rejected as rejected:
            if rejected.code == "run_over":
                return False
            raise

    async def _prompt(self, task: Task) -> str:
        project = await queries.project(self.log, task.project_id)
        dependencies = [d for d in [await queries.task(self.log, i) for i in task.depends_on] if d]
        return compose_prompt(project.context if project else None, dependencies, task)

    async def _drive(self, task: Task, agent: Agent, messages: asyncio.Queue) -> None:
        run_id = task.run_id or ""

        async def record_output(chunks):
            if not await self._record(task.id, RecordOutput(run_id=run_id, chunks=chunks)):
                raise asyncio.CancelledError  # the run is over (cancelled): stop producing

        output = _Output(record_output)

        async def ask(prompt: str) -> str:
            await output.flush()
            await self._record(task.id, RequestInput(run_id=run_id, prompt=prompt))
            return await messages.get()

        ctx = RunContext(
            task=task, run_id=run_id, agent=agent, prompt=await self._prompt(task),
            workdir=Path(self.settings.data_dir) / "runs" / task.id, emit=output.emit, ask=ask, messages=messages,
        )
        timeout = task.timeout_seconds or self.settings.default_timeout_seconds
        try:
            try:
                async with asyncio.timeout(timeout):
                    result = await AGENTS[agent.kind](ctx)
            finally:
                await output.close()
            ending: Command = FinishRun(run_id=run_id, approval_id=str(uuid.uuid4()), result=_bounded(result))
        except TimeoutError:
            ending = FailRun(run_id=run_id, reason="timeout", error=f"The run took longer than {timeout} s.")
        except RunFailed as failed:
            ending = FailRun(
                run_id=run_id, reason=failed.reason, error=failed.error, exit_code=failed.exit_code,
                result=_bounded(failed.result),
            )
        except asyncio.CancelledError:
            return
        except Exception as exc:  # an agent's bug still ends the run on the record
            log.exception("run failed", task_id=task.id, run_id=run_id)
            ending = FailRun(run_id=run_id, reason="error", error=f"{type(exc).__name__}: {exc}")
        finally:
            current = self.runs.get(task.id)
            if current is not None and current[0] == run_id:
                del self.runs[task.id]
        await self._record(task.id, ending)


def _bounded(text: str | None) -> str | None:
    """A deliverable is kept whole up to 64 KiB; past that, its tail."""
    if text is None or len(text) <= RESULT_LIMIT:
        return text
    return text[-RESULT_LIMIT:]
