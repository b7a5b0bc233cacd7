"""The Executor with real subprocesses (the `shell` and `exec` kinds) and a reporter that records
what it is told: output numbered in order and cut between characters, the output before a
question, every ending, a lost lease and a cancel stopping the run's processes."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from service.work import wire
from service.work.executor import Executor, LeaseLost, Pacing
from tests.test_runner import gone


class Recording:
    """A Reporter that records every call; `refuse` names the call that answers LeaseLost."""

    def __init__(self, refuse: str | None = None):
        self.refuse = refuse
        self.calls: list[tuple[str, object]] = []
        self.on_ask: Callable[[wire.Ask], None] = lambda question: None

    async def output(self, run: wire.Assignment, chunks: list[wire.Chunk]) -> int:
        self.calls.append(("output", list(chunks)))
        if self.refuse == "output":
            raise LeaseLost("cancelled")
        await asyncio.sleep(0)  # a report takes a moment: writes go on meanwhile
        return chunks[-1].seq

    async def ask(self, run: wire.Assignment, question: wire.Ask) -> None:
        self.calls.append(("ask", question))
        if self.refuse == "ask":
            raise LeaseLost("cancelled")
        self.on_ask(question)

    async def finish(self, run: wire.Assignment, ending: wire.Ending) -> str:
        self.calls.append(("finish", ending))
        return "done" if ending.outcome == "done" else "failed"

    def chunks(self) -> list[wire.Chunk]:
        """Every chunk reported, in the order reported, the ending's included."""
        found: list[wire.Chunk] = []
        for name, value in self.calls:
            if name == "output":
                found += value  # type: ignore[arg-type]
            elif name == "finish":
                found += value.output  # type: ignore[union-attr]
        return found

    def text(self, stream: str | None = None) -> str:
        return "".join(c.chunk for c in self.chunks() if stream in (None, c.stream))

    def ending(self) -> wire.Ending:
        (ending,) = [value for name, value in self.calls if name == "finish"]
        return ending  # type: ignore[return-value]


def assignment(kind: str, content: str = "", prompt: str = "", timeout: int = 30, **config) -> wire.Assignment:
    return wire.Assignment(
        run_id=f"run-{kind}", lease=wire.lease_token(f"run-{kind}", 1), task_id="task-1", number=1,
        task=wire.TaskBrief(type="command" if kind == "shell" else "prompt", content=content or prompt),
        agent=wire.AgentBrief(id="agent-1", name=f"{kind}-agent", kind=kind, config=config),  # type: ignore[arg-type]
        prompt=prompt or content, timeout_seconds=timeout, lease_seconds=30,
    )


async def until(condition: Callable[[], object], what: str, timeout: float = 15.0):
    """The async twin of api_helpers.wait_for: polls until `condition()` is truthy, bounded."""
    try:
        async with asyncio.timeout(timeout):
            while not (found := condition()):
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
    return found


async def execute(executor: Executor) -> None:
    async with asyncio.timeout(30):  # a hang fails the test, not the suite
        await executor.run()


def pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


# --- output ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pacing", [Pacing(), Pacing(chunk_bytes=50, max_batch_chunks=3)], ids=["default", "small"])
async def test_output_is_numbered_in_order_in_chunks_that_never_cut_a_character(tmp_path, pacing):
    # ~66 KB of two- and three-byte characters on stdout, stderr between: many cuts, many reports.
    script = r"printf 'start\n' >&2; for i in $(seq 1 6000); do printf 'é%05d€\n' $i; done; printf 'end\n' >&2"
    reporter = Recording()
    await execute(Executor(assignment("shell", script), tmp_path, reporter, pacing))

    chunks = reporter.chunks()
    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))
    assert reporter.ending().last_seq == len(chunks)
    assert all(len(c.chunk.encode()) <= pacing.chunk_bytes for c in chunks)
    assert len(chunks) > 66_000 // pacing.chunk_bytes
    assert all(len(value) <= pacing.max_batch_chunks for name, value in reporter.calls if name == "output")
    stdout = "".join(f"é{i:05d}€\n" for i in range(1, 6001))
    assert reporter.text("stdout") == stdout  # a cut inside a character would show as U+FFFD
    assert reporter.text("stderr") == "start\nend\n"
    assert reporter.calls[0][0] == "output"  # sent while it ran, not all at the end
    assert (reporter.ending().outcome, reporter.ending().result) == ("done", stdout)


ASKING = textwrap.dedent("""\
    import sys
    print("prompt:", sys.stdin.readline().rstrip("\\n"), flush=True)
    print("x" * 40000, flush=True)
    sys.stderr.write("thinking\\n"); sys.stderr.flush()
    print("@@mc:input What is your name?", flush=True)
    print("hello", sys.stdin.readline().rstrip("\\n"), flush=True)
    print("and", sys.stdin.readline().rstrip("\\n"), flush=True)
""")


async def test_a_question_comes_after_the_output_before_it_and_messages_reach_stdin(tmp_path):
    program = tmp_path / "agent.py"
    program.write_text(ASKING)
    reporter = Recording()
    executor = Executor(assignment("exec", prompt="Say hi", argv=[sys.executable, str(program)]), tmp_path, reporter)
    reporter.on_ask = lambda question: (executor.deliver("Ada"), executor.deliver("Bob"))
    await execute(executor)

    (at,) = [i for i, (name, _) in enumerate(reporter.calls) if name == "ask"]
    question = reporter.calls[at][1]
    assert isinstance(question, wire.Ask)
    before = [c for name, value in reporter.calls[:at] if name == "output" for c in value]  # type: ignore[attr-defined]
    assert (question.number, question.prompt) == (1, "What is your name?")
    assert question.after_seq == before[-1].seq == len(before)  # everything written before it, sent before it
    assert "".join(c.chunk for c in before if c.stream == "stdout") == "prompt: Say hi\n" + "x" * 40000 + "\n"
    assert reporter.text("stderr") == "thinking\n"  # another pipe: before or after the question
    ending = reporter.ending()
    assert ending.outcome == "done" and ending.result is not None
    assert ending.result.endswith("hello Ada\nand Bob\n")


# --- endings ----------------------------------------------------------------------------------------


async def test_a_timeout_fails_the_run_with_the_output_so_far_and_stops_its_processes(tmp_path):
    reporter = Recording()
    await execute(Executor(assignment("shell", "echo started; sleep 60 & echo $!; wait", timeout=1), tmp_path, reporter))
    ending = reporter.ending()
    assert (ending.outcome, ending.reason) == ("failed", "timeout")
    started, pid = reporter.text().split()
    assert started == "started" and ending.last_seq == len(reporter.chunks())
    assert gone(int(pid))


async def test_a_non_zero_exit_fails_the_run_with_its_code(tmp_path):
    reporter = Recording()
    await execute(Executor(assignment("shell", "echo partial; echo oops >&2; exit 7"), tmp_path, reporter))
    ending = reporter.ending()
    assert (ending.outcome, ending.reason, ending.exit_code, ending.result) == ("failed", "exit", 7, "partial\n")
    assert reporter.text("stdout") == "partial\n" and reporter.text("stderr") == "oops\n"


# --- a lost lease and a cancel ------------------------------------------------------------------------

STAYING = "echo $$ > {pids}; sleep 60 & echo $! >> {pids}; {writes}"


@pytest.mark.parametrize("writes", [
    "while true; do echo tick; sleep 0.05; done",  # little output: sent once the flush delay passes
    "yes",  # a flood: sent as the agent writes, which waits for it
])
async def test_a_lost_lease_stops_the_run_s_processes_and_reports_nothing_more(tmp_path, writes):
    record = tmp_path / "pids"
    reporter = Recording(refuse="output")
    await execute(Executor(assignment("shell", STAYING.format(pids=record, writes=writes)), tmp_path, reporter))
    assert [name for name, _ in reporter.calls] == ["output"]  # refused, then silence: no ending
    assert len(pids(record)) == 2
    assert all(gone(pid) for pid in pids(record))


async def test_a_lost_lease_at_a_question_ends_the_run_without_an_ending(tmp_path):
    reporter = Recording(refuse="ask")
    program = tmp_path / "agent.py"
    program.write_text(ASKING)
    executor = Executor(assignment("exec", prompt="hi", argv=[sys.executable, str(program)]), tmp_path, reporter)
    await execute(executor)
    assert [name for name, _ in reporter.calls][-1] == "ask"


async def test_cancel_stops_the_agent_s_processes_and_reports_nothing(tmp_path):
    # One grandchild dies of SIGTERM; the other ignores it and gets SIGKILL after the grace.
    script = "sleep 60 & echo $!; (trap '' TERM; exec sleep 61) & echo $!; wait"
    reporter = Recording()
    executor = Executor(assignment("shell", script, killGraceSeconds=0.5), tmp_path, reporter)
    running = asyncio.create_task(execute(executor))
    started = await until(lambda: len(found := reporter.text().split()) == 2 and found, "both pids")
    assert not any(gone(int(pid)) for pid in started)

    await executor.cancel()
    assert all(gone(int(pid)) for pid in started)  # gone when cancel returns
    await running  # run() returns too
    assert all(name == "output" for name, _ in reporter.calls)
