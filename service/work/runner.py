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
from projections.agents import Agent
from projections.lifecycle import ACTIVE
from projections.readmodels import ReadModels
from projections.tasks import Task
from service.work.agents import RESULT_LIMIT, RunContext, RunFailed
from service.work.agents.kinds import KINDS
from service.work.agents.process import kill_orphans
from service.commands.handling import Commands
from service.commands.deciders import Command, FailRun, FinishRun, RecordOutput, RequestInput, RunOver
from service.settings import Settings

log = structlog.get_logger("mission_control.runner")

ECHO_AGENT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "mission-control:agent:echo"))
RUNNER_ACTOR = "mission-control:runner"
CHUNK_BYTES = 16 * 1024
FLUSH_SECONDS = 0.05
INTERRUPTED = "The service stopped while this run was in progress."


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
        self._flushing: asyncio.Task | None = None  # a reference, so the timer's flush is not collected

    async def emit(self, stream: str, text: str) -> None:
        if not text:
            return
        text = recordable(text)
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1].append(text)
        else:
            self._pending.append((stream, [text]))
        self._size += len(text)  # characters: a cheap lower bound of the bytes
        if self._size >= CHUNK_BYTES:
            await self.flush()  # the producer waits: a chatty run cannot outrun the log
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        self._flushing = asyncio.create_task(self.flush())

    async def flush(self) -> None:
        async with self._lock:
            if chunks := self._take():
                await self._record(chunks)

    async def close(self) -> list[tuple[int, str, str]]:
        """What is left to record, for the run's ending to carry: one append, not two."""
        async with self._lock:  # after any flush in flight, so the order holds
            return self._take()

    def _take(self) -> list[tuple[int, str, str]]:
        """The pending output as numbered chunks of at most CHUNK_BYTES."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._size = self._pending, [], 0
        chunks = []
        for stream, parts in pending:
            for piece in _pieces("".join(parts)):
                self._seq += 1
                chunks.append((self._seq, stream, piece))
        return chunks


class Runner:
    def __init__(self, log_: EventLog, models: ReadModels, commands: Commands, settings: Settings):
        self.log = log_
        self.models = models
        self.commands = commands
        self.settings = settings
        self.runs: dict[str, tuple[str, asyncio.Task, asyncio.Queue]] = {}

    async def recover(self) -> int:
        """End every run a previous process left in progress, and whatever processes it left
        running: nothing stays running forever."""
        stuck, _ = await self.models.tasks(statuses=sorted(ACTIVE), archived=None, limit=1_000_000)
        runs_dir = Path(self.settings.data_dir) / "runs"
        await asyncio.to_thread(kill_orphans, [task.run_id for task in stuck if task.run_id], runs_dir)
        for task in stuck:
            await self._record(task.id, FailRun(run_id=task.run_id or "", reason="interrupted", error=INTERRUPTED))
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

    async def stop(self, task_id: str, run_id: str) -> None:
        """Stop that run of the task, if it is still going (never a later run of it)."""
        run = self.runs.get(task_id)
        if run is not None and run[0] == run_id:
            del self.runs[task_id]
            run[1].cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run[1]

    async def close(self) -> None:
        """At shutdown: stop every run (their process groups at once) and record each as
        interrupted, as the next start's recovery would."""
        stopping = {task_id: run[0] for task_id, run in self.runs.items()}
        await asyncio.gather(*(self.stop(task_id, run_id) for task_id, run_id in stopping.items()))
        for task_id, run_id in stopping.items():
            await self._record(task_id, FailRun(run_id=run_id, reason="interrupted", error=INTERRUPTED))

    async def _record(self, task_id: str, command: Command) -> bool:
        try:
            await self.commands.task(task_id, command, Meta(actor=RUNNER_ACTOR))
            return True
        except RunOver:
            return False

    async def _prompt(self, task: Task) -> str:
        project = await self.models.project(task.project_id)
        dependencies = [d for d in [await self.models.task(i, with_watchers=False) for i in task.depends_on] if d]
        return compose_prompt(project.context if project else None, dependencies, task)

    async def _drive(self, task: Task, agent: Agent, messages: asyncio.Queue) -> None:
        run_id = task.run_id or ""
        job = asyncio.current_task()
        assert job is not None

        async def record(command: Command) -> None:
            if not await self._record(task.id, command):
                job.cancel()  # the run was ended elsewhere (cancelled): stop the agent

        output = _Output(lambda chunks: record(RecordOutput(run_id=run_id, chunks=chunks)))

        asked = 0

        async def request_input(prompt: str) -> None:
            nonlocal asked
            asked += 1  # each question numbered, as a desktop numbers them: a resend is recognised
            await output.flush()
            await record(RequestInput(run_id=run_id, prompt=prompt, number=asked))

        ctx = RunContext(
            task=task, run_id=run_id, agent=agent, prompt=await self._prompt(task),
            workdir=Path(self.settings.data_dir) / "runs" / task.id, emit=output.emit,
            request_input=request_input, messages=messages,
        )
        timeout = task.timeout_seconds or self.settings.default_timeout_seconds
        last: list[tuple[int, str, str]] = []
        try:
            try:
                async with asyncio.timeout(timeout):
                    result = await KINDS[agent.kind].run(ctx)
            finally:
                last = await output.close()
            ending: Command = FinishRun(
                run_id=run_id, approval_id=str(uuid.uuid4()), result=_bounded(result), output=last,
            )
        except TimeoutError:
            ending = FailRun(
                run_id=run_id, reason="timeout", error=f"The run took longer than {timeout} s.", output=last,
            )
        except RunFailed as failed:
            ending = FailRun(
                run_id=run_id, reason=failed.reason, error=recordable(failed.error), exit_code=failed.exit_code,
                result=_bounded(failed.result), output=last,
            )
        except asyncio.CancelledError:
            return
        except Exception as exc:  # an agent's bug still ends the run on the record
            log.exception("run failed", task_id=task.id, run_id=run_id)
            ending = FailRun(run_id=run_id, reason="error", error=recordable(f"{type(exc).__name__}: {exc}"), output=last)
        finally:
            current = self.runs.get(task.id)
            if current is not None and current[0] == run_id:
                del self.runs[task.id]
        try:
            await self._record(task.id, ending)
        except Exception:  # the ending must be on the record, or the run holds its slot forever
            log.exception("could not record a run's end", task_id=task.id, run_id=run_id)
            await self._record(task.id, FailRun(
                run_id=run_id, reason="error", error="The run ended, but its ending could not be recorded.",
            ))


def recordable(text: str) -> str:
    """Text an agent produced, with what UTF-8 cannot hold (a provider's lone surrogate) replaced."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _bounded(text: str | None) -> str | None:
    """A deliverable is kept whole up to RESULT_LIMIT characters; past that, its tail."""
    if text is None:
        return None
    return recordable(text if len(text) <= RESULT_LIMIT else text[-RESULT_LIMIT:])


def _pieces(text: str) -> list[str]:
    """`text` in pieces of at most CHUNK_BYTES of UTF-8, cut between characters. A lone
    surrogate (which UTF-8 cannot hold, so no event could) becomes '?'."""
    data = text.encode("utf-8", "replace")
    pieces, start = [], 0
    while start < len(data):
        end = min(start + CHUNK_BYTES, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte: back off
            end -= 1
        pieces.append(data[start:end].decode())
        start = end
    return pieces
