"""One way to execute a run, wherever its desktop is: the Executor, and the Reporter it reports to.

The Executor takes an `Assignment`, the desktop's working directory and a `Reporter`; it runs the
agent kind, enforces the timeout, numbers the output into chunks (the seq is the wire's), sends
them one batch at a time, flushes them before a question, and ends with one `Ending`. It knows
nothing of the log or of HTTP: the node's own desktop reports straight to the handlers
(service/work/local.py), a remote worker over HTTP (service/work/worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
import stat
from collections.abc import AsyncIterable, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Protocol, TypeVar

import msgspec
import structlog

from events.types import TokenUsage
from projections import usage
from projections.artifacts import File
from service.work.agents import RESULT_LIMIT, RunContext, RunFailed
from service.work.agents.kinds import KINDS
from service.work.wire import Ask, Assignment, Chunk, Ending, Registered

log = structlog.get_logger("mission_control.executor")

CHUNK_BYTES = 16 * 1024
FLUSH_SECONDS = 0.05
MAX_BATCH_CHUNKS = 64

T = TypeVar("T")


class LeaseLost(Exception):
    """The server refused a report: the run is no longer this desktop's (cancelled, lapsed,
    superseded by a newer session, or its key revoked). The executor stops the run and reports
    nothing more about it."""


class Reporter(Protocol):
    """Where a run's reports go. Each method raises `LeaseLost` when the server refuses the run;
    anything else it raises is a failure to report (its chunks are sent again later)."""

    async def output(self, run: Assignment, chunks: list[Chunk]) -> int:
        """Record these chunks (in seq order, resends harmless); the seq acknowledged."""

    async def ask(self, run: Assignment, question: Ask) -> None:
        """Record the run's question (its output up to `after_seq` is acknowledged); the answer
        arrives as a message."""

    async def finish(self, run: Assignment, ending: Ending) -> str:
        """Record how the run ended, with its unacknowledged output; the task's status after it."""

    async def fetch(self, run: Assignment, file: File, into: Path) -> None:
        """Write one of the run's inputs to `into`, its bytes checked against its hash."""

    async def upload(self, run: Assignment, file: Path, name: str, content_type: str) -> File:
        """Store a file the run left under `outputs/`; the ending names what this answers."""


class Pacing(msgspec.Struct, frozen=True, kw_only=True):
    """How output is cut and sent: the server tells a worker these when it registers."""

    chunk_bytes: int = CHUNK_BYTES
    """The most UTF-8 bytes in one chunk; also how much pending output makes the agent's writes wait."""
    flush_seconds: float = FLUSH_SECONDS
    """How long output may wait before it is sent."""
    max_batch_chunks: int = MAX_BATCH_CHUNKS

    @classmethod
    def told(cls, registered: Registered) -> Pacing:
        return cls(
            chunk_bytes=registered.chunk_bytes, flush_seconds=registered.flush_milliseconds / 1000,
            max_batch_chunks=registered.max_batch_chunks,
        )


def runs_dir(workdir: Path) -> Path:
    """Where a desktop's runs work (`<workdir>/runs/<runId>`, one directory per run) and their `.pids`
    records are kept."""
    return workdir / "runs"


INPUTS, OUTPUTS = "inputs", "outputs"
"""In a run's working directory: the files staged for it, and those it leaves as its artifacts."""


def left_outputs(run_dir: Path) -> list[Path]:
    """The regular files directly under `outputs/`, by name; a symlink (which could name any file of
    the desktop) or a directory is no artifact."""
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(run_dir / OUTPUTS):
            if stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                found.append(Path(entry.path))
    return sorted(found, key=lambda path: path.name)


async def write_checked(chunks: AsyncIterable[bytes], file: File, into: Path) -> None:
    """`chunks` written to `into`, refused (the file removed) unless they are the file's bytes."""
    found = hashlib.sha256()
    try:
        with open(into, "wb") as out:  # buffered: its write() writes all or raises
            async for chunk in chunks:
                found.update(chunk)
                await asyncio.to_thread(out.write, chunk)
        if found.hexdigest() != file.sha256:
            raise ValueError(f"its bytes hash to {found.hexdigest()}, not {file.sha256}")
    except BaseException:
        into.unlink(missing_ok=True)
        raise


def content_type_of(name: str) -> str:
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


class Executor:
    """Executes one assignment. `await run()` returns once its ending is reported, or once the run
    was cancelled (`cancel()`) or its lease lost; `deliver()` passes a message to the agent."""

    def __init__(self, assignment: Assignment, workdir: Path, reporter: Reporter, pacing: Pacing = Pacing()):
        self.assignment = assignment
        self.workdir = workdir
        self.reporter = reporter
        self.messages: asyncio.Queue[str] = asyncio.Queue()
        self._output = _Output(self._send, pacing)
        self._asked = 0
        self._over = False
        """Cancelled, or its lease lost: nothing more is reported."""
        self._agent: asyncio.Task | None = None
        self._usage: TokenUsage | None = None
        """What the agent last reported it has spent."""

    @property
    def run_dir(self) -> Path:
        return runs_dir(self.workdir) / self.assignment.run_id

    async def _fetch_inputs(self) -> None:
        run = self.assignment
        if not run.inputs:
            return
        inputs = self.run_dir / INPUTS
        await asyncio.to_thread(inputs.mkdir, parents=True, exist_ok=True)
        for file in run.inputs:
            try:
                await self._report(lambda: self.reporter.fetch(run, file, inputs / file.name))
            except LeaseLost:
                raise
            except Exception as exc:
                raise RunFailed("error", f"Input {file.name!r} ({file.sha256}) could not be fetched: {exc}") from None

    async def _upload_outputs(self, ending: Ending) -> Ending:
        """The ending naming what the run left under `outputs/`, each stored; one that cannot be
        stored fails the run (saying which), since its deliverable would be incomplete."""
        run = self.assignment
        stored = []
        for path in await asyncio.to_thread(left_outputs, self.run_dir):
            try:
                file = await self._report(
                    lambda: self.reporter.upload(run, path, path.name, content_type_of(path.name)))
            except LeaseLost:
                raise
            except Exception as exc:
                log.warning("could not store an output", run_id=run.run_id, name=path.name, error=str(exc))
                return msgspec.structs.replace(
                    ending, outcome="failed", reason="error", artifacts=[msgspec.to_builtins(f) for f in stored],
                    error=recordable(f"Output {path.name!r} could not be stored: {exc}"),
                )
            stored.append(file)
        return msgspec.structs.replace(ending, artifacts=[msgspec.to_builtins(f) for f in stored])

    def deliver(self, message: str) -> None:
        self.messages.put_nowait(message)

    async def cancel(self) -> None:
        """Stop the agent (a process kind's group: SIGTERM, its grace, SIGKILL) and report nothing
        more; returns once it has stopped."""
        self._over = True
        if self._agent is not None and not self._agent.done():
            self._agent.cancel()
            await asyncio.wait({self._agent})

    async def run(self) -> None:
        if self._over:
            return
        self._agent = asyncio.create_task(self._execute(), name=f"agent-{self.assignment.run_id}")
        try:
            ending = await self._agent
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():  # run() itself was cancelled (the agent with it)
                raise
            return  # cancel(), or a lost lease
        if not self._over:
            await self._finish(ending)

    async def _execute(self) -> Ending:
        """Run the agent to its end; how it ended (without its output yet)."""
        run = self.assignment
        ctx = RunContext(
            task=run.task, task_id=run.task_id, run_id=run.run_id, agent=run.agent, prompt=run.prompt,
            workdir=self.run_dir, emit=self._output.emit, request_input=self._ask,
            messages=self.messages, spent=self._spent,
        )
        ending = await self._outcome(ctx)
        ending.usage = self._usage
        return ending

    async def _outcome(self, ctx: RunContext) -> Ending:
        run = self.assignment
        try:
            kind = KINDS.get(run.agent.kind)
            if kind is None:
                raise RunFailed("error", f"This desktop cannot run agents of kind {run.agent.kind}.")
            async with asyncio.timeout(run.timeout_seconds):
                await self._fetch_inputs()
                result = await kind.run(ctx)
            return Ending(outcome="done", result=_bounded(result))
        except TimeoutError:
            return Ending(
                outcome="failed", reason="timeout", error=f"The run took longer than {run.timeout_seconds} s.",
            )
        except RunFailed as failed:
            return Ending(
                outcome="failed", reason=failed.reason, error=recordable(failed.error),  # type: ignore[arg-type]
                exit_code=failed.exit_code, result=_bounded(failed.result),
            )
        except Exception as exc:  # an agent's bug still ends the run on the record
            if not self._over:
                log.exception("run failed", task_id=run.task_id, run_id=run.run_id)
            return Ending(outcome="failed", reason="error", error=recordable(f"{type(exc).__name__}: {exc}"))

    def _spent(self, tokens: TokenUsage) -> None:
        """The agent's report of its usage so far; the run stops once it costs more than the budget left."""
        self._usage = tokens
        left = self.assignment.budget_left_usd
        if left is None:
            return
        cost = usage.cost(tokens, self.assignment.agent.config)
        if cost is not None and cost > Decimal(left):
            raise RunFailed(
                "error", f"The run was stopped: its usage ({tokens.prompt_tokens} prompt and "
                f"{tokens.completion_tokens} completion tokens, ${usage.text(cost)}) crossed the budget of agent "
                f"{self.assignment.agent.name} (config.budgetUsd), of which ${left} was left when it started.",
            )

    async def _ask(self, prompt: str) -> None:
        self._asked += 1
        number = self._asked

        async def ask(after_seq: int) -> None:
            question = Ask(number=number, prompt=prompt, after_seq=after_seq)
            await self._report(lambda: self.reporter.ask(self.assignment, question))

        await self._output.flush(then=ask)  # the output first: a question never overtakes it

    async def _send(self, chunks: list[Chunk]) -> int:
        return await self._report(lambda: self.reporter.output(self.assignment, chunks))

    async def _report(self, send: Callable[[], Awaitable[T]]) -> T:
        """One report, unless the run is over here; a refusal stops the agent, from wherever it came."""
        if not self._over:
            try:
                return await send()
            except LeaseLost:
                self._over = True
        if asyncio.current_task() is self._agent:  # the agent itself reported: it unwinds as if cancelled
            await asyncio.sleep(0)  # a cancel already requested is taken here, not in its cleanup
            raise asyncio.CancelledError
        if self._agent is not None:
            self._agent.cancel()
        raise LeaseLost("The run is no longer this desktop's.")

    async def _finish(self, ending: Ending) -> None:
        run = self.assignment
        try:
            ending = await self._upload_outputs(ending)
            ending.output, ending.last_seq = await self._output.close()
            await self._report(lambda: self.reporter.finish(run, ending))
        except LeaseLost:
            return
        except Exception:  # the ending must reach the server, or the run holds its slot until its lease lapses
            log.exception("could not report a run's end", task_id=run.task_id, run_id=run.run_id)
            with contextlib.suppress(Exception):
                fallback = Ending(
                    outcome="failed", reason="error", error="The run ended, but its ending could not be recorded.",
                    output=ending.output, last_seq=ending.last_seq, usage=ending.usage,
                )
                await self._report(lambda: self.reporter.finish(run, fallback))


class _Output:
    """Coalesces a run's output into numbered chunks, sent one batch at a time so their order
    holds: a batch once the flush delay passes, or at once when the pending output reaches a
    chunk, in which case the agent's write waits for it (a chatty run cannot outrun its reports).
    What a report did not acknowledge is sent again with the next batch, or with the ending."""

    def __init__(self, send: Callable[[list[Chunk]], Awaitable[int]], pacing: Pacing):
        self._send = send
        self._pacing = pacing
        self._pending: list[tuple[str, list[str]]] = []
        self._size = 0
        self._seq = 0
        self._unacked: list[Chunk] = []
        self._lock = asyncio.Lock()
        """Held while a batch is in flight (and across a question, so no batch overtakes it)."""
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task | None = None  # a reference, so the timer's flush is not collected
        self._closed = False
        """The ending carries what is left: no batch goes after it."""

    async def emit(self, stream: str, text: str) -> None:
        if not text:
            return
        text = recordable(text)
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1].append(text)
        else:
            self._pending.append((stream, [text]))
        self._size += len(text)  # characters: a cheap lower bound of the bytes
        if self._size >= self._pacing.chunk_bytes:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._pacing.flush_seconds, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        self._flushing = asyncio.create_task(self._timed_flush())

    async def _timed_flush(self) -> None:
        try:
            await self.flush()
        except LeaseLost:
            pass  # the executor has stopped the run
        except Exception:  # kept unacknowledged: the next batch or the ending carries it
            log.exception("could not report a run's output")

    async def flush(self, then: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Send everything pending; then (still before any later batch) `then(last seq)`."""
        async with self._lock:
            if self._closed:
                return
            self._unacked += self._take()
            while self._unacked:
                if not await self._send_batch():
                    break
            if then is not None:
                await then(self._seq)

    async def close(self) -> tuple[list[Chunk], int]:
        """What is left to send, for the ending to carry, and the last seq: one report, not two."""
        async with self._lock:  # after any batch in flight, so the order holds
            self._unacked += self._take()
            while len(self._unacked) > self._pacing.max_batch_chunks:
                if not await self._send_batch():
                    break
            self._closed = True
            return self._unacked, self._seq

    async def _send_batch(self) -> bool:
        """Send the first batch of what is unacknowledged; whether all of that batch was acknowledged."""
        batch = self._unacked[: self._pacing.max_batch_chunks]
        acked = await self._send(batch)
        self._unacked = [chunk for chunk in self._unacked if chunk.seq > acked]
        return acked >= batch[-1].seq

    def _take(self) -> list[Chunk]:
        """The pending output as numbered chunks of at most `chunk_bytes`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._size = self._pending, [], 0
        chunks = []
        for stream, parts in pending:
            for piece in _pieces("".join(parts), self._pacing.chunk_bytes):
                self._seq += 1
                chunks.append(Chunk(seq=self._seq, stream=stream, chunk=piece))  # type: ignore[arg-type]
        return chunks


def recordable(text: str) -> str:
    """Text an agent produced, with what UTF-8 cannot hold (a provider's lone surrogate) replaced."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _bounded(text: str | None) -> str | None:
    """A deliverable is kept whole up to RESULT_LIMIT characters; past that, its tail."""
    if text is None:
        return None
    return recordable(text if len(text) <= RESULT_LIMIT else text[-RESULT_LIMIT:])


def _pieces(text: str, size: int) -> list[str]:
    """`text` in pieces of at most `size` bytes of UTF-8, cut between characters. A lone
    surrogate (which UTF-8 cannot hold, so no event could) becomes '?'."""
    data = text.encode("utf-8", "replace")
    pieces, start = [], 0
    while start < len(data):
        end = min(start + size, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte: back off
            end -= 1
        pieces.append(data[start:end].decode())
        start = end
    return pieces
