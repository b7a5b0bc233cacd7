"""The remote worker, `mission-control worker`: this machine as one desktop of a server.

It registers as the desktop its key names, long-polls for the runs placed there, carries each out
in an Executor (the code the node's own desktop runs too) and reports through an `HttpReporter`:
output as numbered batches, one request in flight per run, each resent after a backoff until it
is acknowledged, so a dropped connection or a server restart loses and repeats nothing. The poll
is its heartbeat: it renews the leases of the runs it lists and brings back their messages and
cancellations. The first SIGTERM (or SIGINT) drains it; a second one stops its runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import random
import signal
import socket
import sys
import urllib.parse
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import IO

import httpx
import msgspec
import structlog

from events.types import AgentKind
from service.ids import new_id
from service.work import wire
from service.work.agents.process import kill_orphans, records
from projections.artifacts import File
from service.artifacts import file_chunks
from service.work.executor import Executor, LeaseLost, Pacing, runs_dir, write_checked

log = structlog.get_logger("mission_control.worker")

API = "/api/mission-control"
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 5.0
SHUTDOWN_ATTEMPTS = 8
"""Tries (about 20 s of backoff) at what a stopping worker still says: it must not hang its exit."""
STOPPED = "The worker on desktop {desktop} was stopped while this run was in progress."
KINDS: tuple[str, ...] = AgentKind.__args__  # type: ignore[attr-defined]


class Fatal(Exception):
    """The worker can never succeed (its key is refused, it names another desktop): exit 2 with this."""


class Options(msgspec.Struct, kw_only=True):
    server: str
    token: str
    desktop: str | None = None
    agents: list[str] = msgspec.field(default_factory=lambda: ["echo", "openai"])
    capacity: int = 1
    workdir: Path = Path("mission-control-worker")


def parse_agents(text: str) -> list[str]:
    """`echo,openai` as a list of kinds; ValueError naming a kind that is none."""
    agents = list(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    unknown = [a for a in agents if a not in KINDS]
    if unknown or not agents:
        raise ValueError(f"--agents takes a comma list of {', '.join(KINDS)}, not {text!r}")
    return agents


def backoff(attempt: int) -> float:
    """0.25 s doubling to 5 s, each drawn from its upper half: many workers do not retry in step."""
    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt)
    return random.uniform(delay / 2, delay)


def _detail(answer: httpx.Response) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(answer.json()["detail"])
    return f"HTTP {answer.status_code}: {answer.text[:200]}"


def _code(answer: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
        return answer.json()["code"]
    return None


class Api:
    """POSTs to the worker routes, each resent after a backoff while the server is unreachable,
    answers 5xx or 503 (it is restarting), or 429 (the key's rate limit). A 401 or 403 is `Fatal`:
    no resend can succeed."""

    def __init__(self, server: str, token: str, client: httpx.AsyncClient | None = None):
        self.client = client or httpx.AsyncClient(
            base_url=server.rstrip("/") + API, timeout=httpx.Timeout(30, connect=5),
            headers={"Authorization": f"Bearer {token}",
                     "User-Agent": f"mission-control-worker/{version('mission-control')}"},
        )

    async def post(
        self, path: str, body: msgspec.Struct | None, headers: dict[str, str] | None = None,
        timeout: float | None = None, attempts: int | None = None,
    ) -> httpx.Response:
        content = b"{}" if body is None else msgspec.json.encode(body)
        headers = {"Content-Type": "application/json", **(headers or {})}
        attempt = 0
        while True:
            try:
                answer = await self.client.post(path, content=content, headers=headers,
                                                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
                if answer.status_code in (401, 403):
                    raise Fatal(_detail(answer))
                if answer.status_code < 500 and answer.status_code != 429:
                    return answer
                problem = f"HTTP {answer.status_code}: {_detail(answer)}"  # 429: the key's rate limit
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            attempt += 1
            if attempts is not None and attempt >= attempts:
                raise ConnectionError(f"{path}: {problem}")
            wait = backoff(attempt - 1)
            if attempt == 1 or attempt % 10 == 0:  # an outage is told once, then now and then
                log.warning("server unavailable, retrying", path=path, problem=problem, attempt=attempt,
                            retry_in=round(wait, 2))
            await asyncio.sleep(wait)

    async def close(self) -> None:
        await self.client.aclose()


class HttpReporter:
    """The Executor's `Reporter` over HTTP. The executor sends one report at a time per run (so the
    server sees its seqs in order); each is resent as it was until the server answers, or from
    `expectedSeq` after a 409 `output_gap`. Every report carries the run's lease (`MC-Lease`); a
    refusal of it (409 `lease_lost`, or 404: the run is not this desktop's) is `LeaseLost`, and so
    is a refused key, which also tells the worker to exit (`on_fatal`)."""

    def __init__(self, api: Api, on_fatal: Callable[[str], None]):
        self.api, self.on_fatal = api, on_fatal
        self.attempts: int | None = None
        """None: resend until the server answers. A stopping worker bounds it."""
        self.acked: dict[str, int] = {}
        """Per run, the last seq the server acknowledged."""
        self.finishing: set[str] = set()
        """Runs whose ending is on its way: a poll that listed them would be answered at once."""

    def forget(self, run_id: str) -> None:
        self.acked.pop(run_id, None)

    async def output(self, run: wire.Assignment, chunks: list[wire.Chunk]) -> int:
        while chunks:
            answer = await self._post(run, "output", wire.OutputBatch(chunks=chunks))
            if answer.status_code == 200:
                acked = msgspec.json.decode(answer.content, type=wire.OutputAck).acked_seq
                self.acked[run.run_id] = max(self.acked.get(run.run_id, 0), acked)
                return acked
            expected = self._expected(run, answer)  # the server has all before it
            chunks = [c for c in chunks if c.seq >= expected]
            if chunks and chunks[0].seq != expected:
                raise RuntimeError(f"the server wants run {run.run_id}'s output from seq {expected}, "
                                   f"which it had acknowledged")
        return self.acked.get(run.run_id, 0)

    async def ask(self, run: wire.Assignment, question: wire.Ask) -> None:
        answer = await self._post(run, "ask", question)
        if answer.status_code != 200:  # the executor sent the output first: the server lost some
            raise RuntimeError(f"the server wants run {run.run_id}'s output from seq {self._expected(run, answer)} "
                               "before its question")

    async def finish(self, run: wire.Assignment, ending: wire.Ending) -> str:
        key = {"Idempotency-Key": f"end-{run.run_id}"}  # a resend answers what the first did
        self.finishing.add(run.run_id)
        try:
            while True:
                answer = await self._post(run, "finish", ending, key)
                if answer.status_code == 200:
                    self.forget(run.run_id)
                    return msgspec.json.decode(answer.content, type=wire.RunStatus).status
                expected = self._expected(run, answer)
                if ending.output or expected <= ending.last_seq:
                    raise RuntimeError(f"the server wants run {run.run_id}'s output from seq {expected} before its "
                                       f"ending, which carries from {ending.output[0].seq if ending.output else '-'}")
                # An ending without output (a stop's) that names less than the server has: a batch
                # whose answer was lost on the way was recorded. The ending names it too.
                ending = msgspec.structs.replace(ending, last_seq=expected - 1)
        finally:
            self.finishing.discard(run.run_id)

    async def fetch(self, run: wire.Assignment, file: File, into: Path) -> None:
        """Streamed to the file as it arrives, checked against its hash; resent whole after a failure."""
        await self._transfer(run, "fetch", lambda: self._fetch_once(run, file, into))

    async def _fetch_once(self, run: wire.Assignment, file: File, into: Path) -> httpx.Response:
        path = f"/worker/runs/{run.run_id}/artifacts/{file.sha256}"
        async with self.api.client.stream("GET", path, headers={"MC-Lease": run.lease}) as answer:
            if answer.status_code == 200:
                await write_checked(answer.aiter_bytes(), file, into)
            else:
                await answer.aread()
            return answer

    async def upload(self, run: wire.Assignment, file: Path, name: str, content_type: str) -> File:
        """The file streamed from disk (never whole in memory); resent whole after a failure."""
        path = f"/worker/runs/{run.run_id}/artifacts/{urllib.parse.quote(name, safe='')}"

        async def once() -> httpx.Response:
            headers = {"MC-Lease": run.lease, "Content-Type": content_type,
                       "Content-Length": str(file.stat().st_size)}
            return await self.api.client.put(path, content=file_chunks(file), headers=headers)

        answer = await self._transfer(run, "upload", once)
        return msgspec.json.decode(answer.content, type=File)

    async def _transfer(self, run: wire.Assignment, what: str, once: Callable) -> httpx.Response:
        """An artifact's transfer, tried again after a backoff while the server is away (as a report
        is); LeaseLost when the run is no longer this desktop's, RuntimeError when it is refused."""
        attempt = 0
        while True:
            try:
                answer = await once()
                if answer.status_code == 200:
                    return answer
                if answer.status_code in (401, 403):
                    self.on_fatal(_detail(answer))
                    raise LeaseLost(_detail(answer))
                if answer.status_code in (404, 409):
                    raise LeaseLost(_detail(answer))
                if answer.status_code < 500 and answer.status_code != 429 or answer.status_code == 507:
                    raise RuntimeError(f"the server refused to {what} it: {_detail(answer)}")
                problem = f"HTTP {answer.status_code}: {_detail(answer)}"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            attempt += 1
            if self.attempts is not None and attempt >= self.attempts:
                raise ConnectionError(problem)
            log.warning("an artifact's transfer failed, retrying", run_id=run.run_id, what=what, problem=problem,
                        attempt=attempt)
            await asyncio.sleep(backoff(attempt - 1))

    def _expected(self, run: wire.Assignment, answer: httpx.Response) -> int:
        """The `expectedSeq` of a 409 `output_gap` (`_post` lets nothing else through)."""
        expected = int(answer.json()["expectedSeq"])
        self.acked[run.run_id] = max(self.acked.get(run.run_id, 0), expected - 1)
        return expected

    async def _post(self, run: wire.Assignment, action: str, body: msgspec.Struct,
                    headers: dict[str, str] | None = None) -> httpx.Response:
        """200, or a 409 `output_gap`; LeaseLost when the run is no longer this desktop's."""
        try:
            answer = await self.api.post(f"/worker/runs/{run.run_id}/{action}", body,
                                         {"MC-Lease": run.lease, **(headers or {})}, attempts=self.attempts)
        except Fatal as fatal:
            self.on_fatal(str(fatal))
            raise LeaseLost(str(fatal)) from None
        if answer.status_code == 200 or (answer.status_code == 409 and _code(answer) == "output_gap"):
            return answer
        if answer.status_code in (404, 409):  # lease_lost: cancelled, lapsed, superseded, revoked
            self.forget(run.run_id)
            raise LeaseLost(_detail(answer))
        raise RuntimeError(f"the server refused a report on run {run.run_id}: {_detail(answer)}")


class _Held:
    """A run this worker is carrying out (or refusing), until its ending is reported."""

    def __init__(self, assignment: wire.Assignment):
        self.assignment = assignment
        self.executor: Executor | None = None
        self.job: asyncio.Task | None = None
        self.messages_seen = 0
        self.cancelling = False
        """Told by the server that it is over, and being stopped: no longer listed in polls."""
        self.stopping = False
        """Being stopped by the worker, which then reports it interrupted (its acknowledged seq kept for that)."""


class Worker:
    def __init__(self, options: Options, api: Api | None = None):
        self.options = options
        self.api = api or Api(options.server, options.token)
        self.workdir = options.workdir.resolve()
        self.session_id = new_id()
        self.desktop = options.desktop or ""
        self.epoch = 0
        self.intervals: wire.Registered | None = None
        self.reporter = HttpReporter(self.api, self._fatal)
        self.pacing = Pacing()
        self.runs: dict[str, _Held] = {}
        self.draining = False
        """Our own drain (a first signal): take nothing new, leave once every run is reported."""
        self.drained_by_admin = False
        self.stopping = False
        self.fatal: str | None = None
        self._interrupt = asyncio.Event()
        """Set by a signal, a refused key or a freed slot: the poll in flight is abandoned."""
        self._asked_free = 0
        """The `free` of the poll in flight."""
        self._drained: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._lock: IO[str] | None = None

    # --- lifetime -----------------------------------------------------------------------------------

    async def main(self) -> int:
        """Run until drained or stopped (0), or until the server refuses the key (2)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        try:
            self._take_workdir()
            registered = await self._unless_interrupted(self._register())
            if registered is None:  # stopped before the server was reached: nothing to leave
                if self.fatal is not None:
                    raise Fatal(self.fatal)
                return 0
            registered.result()
            return await self._serve()
        except Fatal as fatal:
            log.error("worker refused", desktop=self.desktop or None, reason=str(fatal))
            await self._stop_runs(report=False)
            print(f"mission-control: {fatal}", file=sys.stderr, flush=True)
            return 2
        finally:
            await self.api.close()
            if self._lock is not None:
                self._lock.close()

    def _take_workdir(self) -> None:
        """Own the workdir (one worker at a time), then kill what a previous worker on it left
        running: a worker killed mid-run leaves its runs' processes, recorded under runs/."""
        runs = runs_dir(self.workdir)
        runs.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = open(self.workdir / "worker.lock", "a")  # noqa: SIM115 - held for the worker's life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Fatal(f"another worker is running on {self.workdir}; give this one its own --workdir") from None
        left = [path.name.removesuffix(".pids") for path in runs.glob("*.pids")]
        if left:
            killed = kill_orphans(left, runs)
            log.warning("killed what a previous worker left running", runs=len(left), processes=killed)

    async def _register(self) -> None:
        body = wire.Register(
            session_id=self.session_id, desktop_id=self.options.desktop,
            agents=self.options.agents,  # type: ignore[arg-type]  # kinds, checked by parse_agents
            capacity=self.options.capacity, version=version("mission-control"), hostname=socket.gethostname(),
        )
        answer = await self.api.post("/worker/register", body)
        if answer.status_code != 200:  # 404: the key is another desktop's; 409: a node's own desktop
            raise Fatal(_detail(answer))
        registered = msgspec.json.decode(answer.content, type=wire.Registered)
        self.intervals, self.epoch = registered, registered.epoch
        self.desktop = str(registered.desktop.get("id", self.desktop))
        self.pacing = Pacing.told(registered)  # the server's intervals, not this release's
        log.info("registered", desktop=self.desktop, epoch=self.epoch, session=self.session_id,
                 agents=self.options.agents, capacity=self.options.capacity, poll_seconds=registered.poll_seconds,
                 lease_seconds=registered.lease_seconds)

    async def _serve(self) -> int:
        while True:
            if self.fatal is not None:
                raise Fatal(self.fatal)
            if self.stopping:
                await self._stop_runs(report=True)
                await self._leave()
                return 0
            if self.draining and not self.runs:
                if self._drained is not None:
                    await self._drained
                await self._leave()
                return 0
            answer = await self._poll()
            if answer is not None:
                self._handle(answer)

    def _signalled(self, sig: int) -> None:
        if not self.draining:
            self.draining = True
            log.info("draining: taking nothing new, finishing what runs", signal=signal.Signals(sig).name,
                     runs=len(self.runs))
            self._drained = self._spawn(self._drain(), "drain")
        else:
            self.stopping = True
            log.info("stopping every run", signal=signal.Signals(sig).name, runs=len(self.runs))
        self._interrupt.set()

    def _fatal(self, sentence: str) -> None:
        self.fatal = self.fatal or sentence
        self._interrupt.set()

    def _spawn(self, work, name: str) -> asyncio.Task:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)  # referenced until done, so it is not collected
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            answer = await self.api.post("/worker/drain", None, attempts=SHUTDOWN_ATTEMPTS)
            if answer.status_code != 200:
                log.warning("the server refused the drain", reason=_detail(answer))

    async def _leave(self) -> None:
        try:
            answer = await self.api.post("/worker/leave", None, attempts=SHUTDOWN_ATTEMPTS)
        except ConnectionError as exc:
            log.warning("left without telling the server", problem=str(exc))
            return
        log.info("left", desktop=self.desktop, status=answer.status_code)

    # --- the poll -----------------------------------------------------------------------------------

    async def _poll(self) -> wire.PollAnswer | None:
        """One poll, or None when it was abandoned (`_interrupt`) or answered `not_registered` (then
        registered again, the same session: the server restarted or marked the desktop silent)."""
        assert self.intervals is not None
        free = self._asked_free = self._free()
        body = wire.Poll(epoch=self.epoch, free=free, runs=[
            wire.HeldRun(run_id=run_id, lease=held.assignment.lease, messages_seen=held.messages_seen)
            for run_id, held in self.runs.items() if not held.cancelling and run_id not in self.reporter.finishing
        ])
        polled = await self._unless_interrupted(
            self.api.post("/worker/poll", body, timeout=self.intervals.poll_seconds + 30))
        if polled is None:
            return None
        answer = polled.result()  # Fatal raises here
        if answer.status_code == 409 and _code(answer) == "not_registered":
            log.info("registering again", desktop=self.desktop, reason=_detail(answer))
            registered = await self._unless_interrupted(self._register())
            if registered is not None:
                registered.result()
            return None
        if answer.status_code != 200:
            raise RuntimeError(f"the server refused a poll: {_detail(answer)}")
        return msgspec.json.decode(answer.content, type=wire.PollAnswer)

    def _free(self) -> int:
        return 0 if self.draining or self.drained_by_admin else max(0, self.options.capacity - len(self.runs))

    async def _unless_interrupted(self, work) -> asyncio.Future | None:
        """`work` done (its result or exception to take), or None if `_interrupt` came first."""
        self._interrupt.clear()
        doing = asyncio.ensure_future(work)
        interrupted = asyncio.ensure_future(self._interrupt.wait())
        try:
            await asyncio.wait([doing, interrupted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
            if not doing.done():
                doing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await doing
        return None if doing.cancelled() else doing

    def _handle(self, answer: wire.PollAnswer) -> None:
        if answer.drain != self.drained_by_admin:
            log.info("drained by the server" if answer.drain else "resumed", desktop=self.desktop)
            self.drained_by_admin = answer.drain
        for ended in answer.ended:
            held = self.runs.get(ended.run_id)
            # `finished`: its ending is recorded, and the answer to it on its way.
            if held is not None and not held.cancelling and ended.reason != "finished":
                log.info("run ended by the server", run_id=ended.run_id, reason=ended.reason)
                held.cancelling = True
                self._spawn(self._cancel(held), f"cancel-{ended.run_id}")
        for delivered in sorted(answer.messages, key=lambda m: (m.run_id, m.index)):
            held = self.runs.get(delivered.run_id)
            if held is not None and held.executor is not None and delivered.index == held.messages_seen + 1:
                held.messages_seen = delivered.index
                held.executor.deliver(delivered.message)
        for assignment in answer.assignments:
            if assignment.run_id not in self.runs:  # handed out twice (an answer lost): running already
                self._start(assignment)

    # --- runs ---------------------------------------------------------------------------------------

    def _start(self, assignment: wire.Assignment) -> None:
        held = _Held(assignment)
        self.runs[assignment.run_id] = held
        kind = assignment.agent.kind
        log.info("run started", task_id=assignment.task_id, run_id=assignment.run_id, kind=kind)
        if kind not in self.options.agents:  # the owner's list holds even against a server that errs
            held.job = self._spawn(self._refuse(held), f"refuse-{assignment.run_id}")
            return
        # Recorded before the agent starts, so a worker killed mid-run leaves its run findable here.
        records(runs_dir(self.workdir), assignment.run_id).touch()
        held.executor = Executor(assignment, self.workdir, self.reporter, self.pacing)
        held.job = self._spawn(self._run(held), f"run-{assignment.task_id}")

    async def _run(self, held: _Held) -> None:
        run = held.assignment
        try:
            assert held.executor is not None
            await held.executor.run()
        except LeaseLost as lost:
            log.info("run taken back", run_id=run.run_id, reason=str(lost))
        except Exception:
            log.exception("run failed in the worker", task_id=run.task_id, run_id=run.run_id)
        finally:
            self._release(run.run_id, keep_acked=held.stopping)

    async def _refuse(self, held: _Held) -> None:
        run = held.assignment
        error = (f"Desktop {self.desktop} does not host agent kind {run.agent.kind}: its worker runs only "
                 f"{', '.join(self.options.agents)}.")
        log.warning("refused a run of a kind not hosted", run_id=run.run_id, kind=run.agent.kind)
        try:
            await self.reporter.finish(run, wire.Ending(outcome="failed", reason="error", error=error))
        except (LeaseLost, RuntimeError) as exc:
            log.info("could not refuse the run", run_id=run.run_id, reason=str(exc))
        finally:
            self._release(run.run_id)

    def _release(self, run_id: str, keep_acked: bool = False) -> None:
        """The run is no longer this worker's; `keep_acked`: its acknowledged seq is kept for its ending."""
        self.runs.pop(run_id, None)
        if not keep_acked:
            self.reporter.forget(run_id)
        records(runs_dir(self.workdir), run_id).unlink(missing_ok=True)
        log.info("run over", run_id=run_id, running=len(self.runs))
        # The poll held now asked for fewer runs than the worker takes now (a held poll is not woken
        # by a run that it did not list, placed here but beyond its `free`), or it was the last run
        # of a drain: ask again, or leave, at once rather than at the poll's expiry.
        if self.draining or self._asked_free < self._free():
            self._interrupt.set()

    async def _cancel(self, held: _Held) -> None:
        """Stop the run's processes (their groups: SIGTERM, the agent's grace, SIGKILL); it reports nothing."""
        if held.executor is not None:
            await held.executor.cancel()
        if held.job is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await held.job

    async def _stop_runs(self, report: bool) -> None:
        """Stop every run at once; `report`: then tell the server each was interrupted."""
        held = list(self.runs.values())
        self.reporter.attempts = SHUTDOWN_ATTEMPTS
        await asyncio.gather(*(self._stop(h, report) for h in held))

    async def _stop(self, held: _Held, report: bool) -> None:
        run = held.assignment
        held.stopping = True
        if held.executor is not None:
            with contextlib.suppress(Exception):
                await held.executor.cancel()
        if held.job is not None and not held.job.done():
            held.job.cancel()  # whatever it was still sending: the interruption is its last word
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await held.job
        self._release(run.run_id, keep_acked=report)
        if not report:
            return
        # Its output ends with what the server acknowledged; what the agent wrote since goes with it.
        ending = wire.Ending(outcome="failed", reason="interrupted", error=STOPPED.format(desktop=self.desktop),
                             last_seq=self.reporter.acked.get(run.run_id, 0))
        try:
            await self.reporter.finish(run, ending)
            log.info("run interrupted", run_id=run.run_id)
        except (LeaseLost, RuntimeError, ConnectionError) as exc:
            log.warning("could not report a run interrupted", run_id=run.run_id, reason=str(exc))


def main(options: Options) -> int:
    from service.http.logs import configure

    configure()
    return asyncio.run(Worker(options).main())
