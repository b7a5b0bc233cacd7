"""Subprocess plumbing the `shell` and `exec` agents share.

A run's process leads a process group of its own (a new session), so stopping it reaches
every grandchild; it gets a minimal environment; its output is decoded as it streams.

A descendant can leave the group (`setsid`) and its parent (a double fork). So while a run
lives its descendants are looked for (`Descendants`) and recorded by pid and start time in
`<data-dir>/runs/<run-id>.pids`; stopping the run kills each one still the same process, and
a start after a crash kills those the file names. The server is a child subreaper: an orphaned
descendant becomes its child rather than init's, so it can still be found, and is reaped.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import glob
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import IO, Annotated

import msgspec
import psutil
import structlog

from service.work.agents import Config, RunContext, RunFailed, Tail

log = structlog.get_logger("mission_control.agents")

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
READ_BYTES = 64 * 1024
RUN_ID_VARIABLE = "MC_RUN_ID"
"""Set for every run's processes: how recovery finds what a killed server left behind."""

DESCENDANTS_POLL_SECONDS = 0.1
PR_SET_CHILD_SUBREAPER = 36

Sink = Callable[[str], Awaitable[None]]
Feeder = Callable[[asyncio.StreamWriter], Awaitable[None]]


class ProcessConfig(Config):
    allowed_users: list[str] = []
    """Who besides admins may run tasks on this agent (`["*"]`: anyone who can see the task).
    A process agent runs as the service's own OS user, so it is an admin's grant, never a default."""
    env: list[str] = []
    """Names of the server's environment variables the process may see. Without them it gets
    PATH (a fixed default), HOME (its working directory), MC_TASK_ID and MC_RUN_ID only."""
    kill_grace_seconds: Annotated[float, msgspec.Meta(ge=0, le=30)] = 1.0
    """Between SIGTERM and SIGKILL when a run is cancelled or times out."""


class Output:
    """A process's stdout and stderr as the run's output; the tail of stdout is kept as the deliverable."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.tail = Tail()

    async def stdout(self, text: str) -> None:
        self.tail.add(text)
        await self.ctx.emit("stdout", text)

    async def stderr(self, text: str) -> None:
        await self.ctx.emit("stderr", text)


def environment(ctx: RunContext, allowed: Iterable[str]) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": str(ctx.workdir)}
    env.update({name: os.environ[name] for name in allowed if name in os.environ})
    env.update({"MC_TASK_ID": ctx.task_id, RUN_ID_VARIABLE: ctx.run_id})
    return env


async def run_process(
    ctx: RunContext, argv: list[str], config: ProcessConfig, stdout: Sink, stderr: Sink, feed: Feeder | None = None
) -> int:
    """Run argv to its end: output to the sinks as decoded text, stdin written by `feed` (or
    /dev/null). Returns the exit code (negative: killed by that signal). However it ends,
    nothing of its process group survives it."""
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    _become_subreaper()
    try:
        # Popen rather than the loop's subprocess support: it vforks, which stays fast however
        # large the server is (uvloop's spawn takes tens of milliseconds here).
        child = subprocess.Popen(
            argv, cwd=ctx.workdir, env=environment(ctx, config.env), start_new_session=True,
            stdin=subprocess.PIPE if feed else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise RunFailed("error", f"Cannot start {argv[0]}: {exc.strerror or exc}.") from None
    assert child.stdout is not None and child.stderr is not None
    descendants = Descendants(child.pid, ctx.run_id, records(ctx.workdir.parent, ctx.run_id))
    readers = [asyncio.create_task(_pump(child.stdout, stdout)), asyncio.create_task(_pump(child.stderr, stderr))]
    writer = asyncio.create_task(_feed(child.stdin, feed)) if feed and child.stdin else None
    helpers = [*readers, *([writer] if writer else [])]
    exited = asyncio.create_task(_exited(child))
    watching = asyncio.create_task(descendants.watch())
    stopped = False
    try:
        waiting: set[asyncio.Future] = {exited, *helpers}
        while not exited.done():  # a helper that fails ends the run at once
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for helper in done - {exited}:
                helper.result()
        # Whatever the leader left running would keep the pipes open: it ends with the run.
        stopped = True
        await stop_group(child, config.kill_grace_seconds, descendants)
        for reader in readers:
            await reader
        return child.returncode  # type: ignore[return-value]
    finally:
        watching.cancel()
        if not stopped:
            await stop_group(child, config.kill_grace_seconds, descendants)
        for helper in (*helpers, exited):
            helper.cancel()
        await asyncio.gather(*helpers, exited, watching, return_exceptions=True)
        descendants.forget()


async def _pump(pipe: IO[bytes], sink: Sink) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_BYTES)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        # Incremental: a character split across reads is decoded whole; invalid bytes become U+FFFD.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := await reader.read(READ_BYTES):
            if text := decoder.decode(chunk):
                await sink(text)
        if text := decoder.decode(b"", final=True):
            await sink(text)
    finally:
        transport.close()


async def _feed(pipe: IO[bytes], feed: Feeder) -> None:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the program stopped reading
            await feed(asyncio.StreamWriter(transport, protocol, None, loop))
    finally:
        transport.close()


async def _exited(child: subprocess.Popen) -> None:
    """Until the child has exited. It is not reaped: as a zombie it keeps its pid, so its process
    group id cannot be reused by another process before `stop_group` has signalled the group."""
    if child.returncode is not None:
        return
    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:  # no pidfd (Linux before 5.3): a thread waits instead
        await asyncio.to_thread(os.waitid, os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        return
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(pidfd, lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def stop_group(child: subprocess.Popen, grace: float, descendants: Descendants) -> None:
    """SIGTERM the group and every descendant, SIGKILL them once the leader has exited or after
    `grace`, whichever is first (grandchildren that ignore or outlive SIGTERM included), then
    reap the leader."""
    try:
        descendants.look()  # those the leader still holds, however young
        _signal_group(child.pid, signal.SIGTERM)
        descendants.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_exited(child), grace)
    finally:  # even if cancelled again while waiting
        _signal_group(child.pid, signal.SIGKILL)
        descendants.look()
        descendants.signal(signal.SIGKILL)
    await _exited(child)
    child.wait()
    await asyncio.to_thread(descendants.reap)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def finished(code: int, stdout: str) -> str:
    """The deliverable of a process that exited with `code`: its stdout when 0, else RunFailed
    with the exit code (128 + n for a process killed by signal n, as shells report it)."""
    if code == 0:
        return stdout
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        raise RunFailed("exit", f"The process was killed by {name}.", exit_code=128 - code, result=stdout)
    raise RunFailed("exit", f"The process exited with code {code}.", exit_code=code, result=stdout)


def kill_orphans(run_ids: Iterable[str], runs_dir: Path) -> int:
    """SIGKILL what a server that died mid-run (SIGKILL, power loss) left running of these runs:
    every process their records name that is still the same process (same start time, never
    a reused pid), and every process whose environment names one of them. Returns how many."""
    wanted = set(run_ids)
    if not wanted:
        return 0
    killed = 0
    for run_id in wanted:
        path = records(runs_dir, run_id)
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text().splitlines():
                pid, _, started = line.partition(" ")
                with contextlib.suppress(ValueError):
                    killed += _signal_same(int(pid), int(started), signal.SIGKILL)
            path.unlink()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(RUN_ID_VARIABLE) in wanted:
                proc.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    if killed:
        log.warning("killed processes left by interrupted runs", count=killed)
    return killed


def records(runs_dir: Path, run_id: str) -> Path:
    """Where a run's descendants are recorded: beside the runs' working directories."""
    return runs_dir / f"{run_id}.pids"


class Descendants:
    """A run's processes besides its leader, by pid and start time: those under the leader,
    and orphans of the run (reparented to this server) whose environment names it."""

    def __init__(self, leader: int, run_id: str, path: Path):
        self.leader = leader
        self.run_id = run_id
        self.path = path
        self.known: dict[int, int] = {}
        self._file: IO[str] | None = None

    async def watch(self) -> None:
        while True:
            self.look()
            await asyncio.sleep(DESCENDANTS_POLL_SECONDS)

    def look(self) -> None:
        """Record every descendant there is now: from the leader down, from each one known
        (an orphan keeps its children), and the server's children that carry this run's id."""
        roots = [self.leader, *(pid for pid, started in self.known.items() if _started(pid) == started)]
        roots += [pid for pid in _children(os.getpid()) if pid not in self.known and _run_id(pid) == self.run_id]
        seen = set()
        while roots:
            pid = roots.pop()
            if pid in seen:
                continue
            seen.add(pid)
            if pid != self.leader and pid not in self.known and (started := _started(pid)) is not None:
                self._record(pid, started)
            roots += _children(pid)

    def signal(self, sig: int) -> None:
        for pid, started in self.known.items():
            _signal_same(pid, started, sig)

    def reap(self) -> None:
        """Wait for those that are this server's children (orphans it adopted), so none stays a zombie."""
        for pid, started in list(self.known.items()):  # in a thread, while `look` may add to it
            if _started(pid) == started and _parent(pid) == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)  # its own child: no one else can reap it, nor reuse its pid first

    def forget(self) -> None:
        """The run is over and every process of it dead: no record left for a recovery."""
        if self._file is not None:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def _record(self, pid: int, started: int) -> None:
        self.known[pid] = started
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run's life
        self._file.write(f"{pid} {started}\n")
        self._file.flush()  # in the kernel's hands: it survives the server's SIGKILL


def _become_subreaper() -> None:
    """Orphaned descendants of runs become this process's children instead of init's (Linux)."""
    global _subreaper
    if not _subreaper and sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _subreaper = True


_subreaper = False


def _signal_same(pid: int, started: int, sig: int) -> bool:
    """Signal pid if it is still the process that started at `started`. Through a pidfd, so
    the pid cannot be reused between the check and the signal."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if _started(pid) != started:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError, ValueError):
            found += map(int, Path(path).read_text().split())
    return found


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 on (the command name, which may hold anything, cut off)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _started(pid: int) -> int | None:
    """When the process started, in clock ticks since boot: with its pid, it names one process."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _run_id(pid: int) -> str | None:
    try:
        return psutil.Process(pid).environ().get(RUN_ID_VARIABLE)
    except (psutil.Error, OSError):
        return None
