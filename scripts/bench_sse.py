#!/usr/bin/env python
"""`bench.py sse`: the activity stream under 1,000 subscribers, against a bare sse-starlette floor.

    .venv/bin/python scripts/bench.py sse [--subscribers 1000] [--rate 20] [--seconds 30] [--catchup 100000]

1. Fan-out. A real `mission-control serve` (its own process); 1,000 subscribers in one client
   process (asyncio protocols that parse the chunked SSE bytes themselves, so the client is not
   the bottleneck); tasks created over HTTP at `rate`/s. Each task carries the wall time it was
   sent (metadata.sentUs, in microseconds: the API refuses integers past 2^53), so a subscriber
   knows append->receipt latency on arrival. Lost events are those of the log (GET /events)
   that a subscriber did not get.
2. The floor. The same events, at the same rate, through a bare sse-starlette endpoint (its own
   uvicorn process) that broadcasts them from an in-memory list to the same 1,000 clients.
3. Catch-up. One client reads a log of `catchup` past events from the start.

Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STREAM_PATH = "/api/mission-control/activity/stream"
SENT = b'"sentUs":'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def line(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<34}{value:>16}   {note}".rstrip(), flush=True)


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# --- the client side: SSE over raw asyncio protocols ------------------------------------------


class Subscriber(asyncio.Protocol):
    """One SSE connection. Undoes the chunked encoding, splits messages, and notes for each event
    its id and, if it carries `sentUs`, the latency of its arrival."""

    def __init__(self, request: bytes, ready: asyncio.Future, keep_latency: bool = True):
        self.request, self.ready = request, ready
        self.keep_latency = keep_latency
        self.head = b""
        self.raw = b""
        self.left = 0  # >0: chunk bytes to come; -2: the CRLF after a chunk; 0: a size line
        self.text = b""
        self.ids: list[int] = []
        self.latencies: list[int] = []  # microseconds
        self.last_at = 0
        self.closed = asyncio.get_running_loop().create_future()
        self.ended = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the stream started: {self.head[:200]!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if not self.ready.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 200"):
                self.ready.set_exception(ConnectionError(self.head[:300].decode(errors="replace")))
                return
            data, self.head = self.head[end + 4:], self.head[:end]
            self.ready.set_result(None)
        body = self._dechunk(data)
        if not body:
            return
        messages = (self.text + body).split(b"\r\n\r\n")
        self.text = messages.pop()
        for message in messages:
            if message.startswith(b"id: "):
                newline = message.find(b"\r\n")
                self.ids.append(int(message[4:newline]))
                self.last_at = now
                if self.keep_latency and (at := message.find(SENT)) >= 0:
                    start = at + len(SENT)
                    stop = start
                    while message[stop] in b"0123456789":
                        stop += 1
                    self.latencies.append(now // 1000 - int(message[start:stop]))

    def _dechunk(self, data: bytes) -> bytes:
        raw = self.raw + data if self.raw else data
        out, pos, n = [], 0, len(raw)
        while pos < n:
            if self.left > 0:
                take = min(self.left, n - pos)
                out.append(raw[pos:pos + take])
                pos += take
                self.left -= take
                if self.left == 0:
                    self.left = -2
            elif self.left == -2:
                if n - pos < 2:
                    break
                pos += 2
                self.left = 0
            else:
                newline = raw.find(b"\r\n", pos)
                if newline < 0:
                    break
                size = int(raw[pos:newline], 16)
                pos = newline + 2
                if size == 0:
                    self.ended = True
                    pos = n
                    break
                self.left = size
        self.raw = raw[pos:]
        return b"".join(out)


def request_bytes(port: int, path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n{auth}\r\n".encode()


async def subscribe(port: int, path: str, token: str | None, count: int) -> list[Subscriber]:
    loop = asyncio.get_running_loop()
    request = request_bytes(port, path, token)
    gate = asyncio.Semaphore(64)  # connect in waves, not 1,000 SYNs at once

    async def one() -> Subscriber:
        async with gate:
            ready = loop.create_future()
            _, protocol = await loop.create_connection(lambda: Subscriber(request, ready), "127.0.0.1", port)
            await asyncio.wait_for(ready, 30)
            return protocol

    return await asyncio.gather(*(one() for _ in range(count)))


class Pipe:
    """JSON lines to and from a child process: the driver's side, or the child's (stdin/stdout)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def send(self, message) -> None:
        self.writer.write(json.dumps(message) + "\n")
        self.writer.flush()

    def recv(self):
        text = self.reader.readline()
        if not text:
            raise EOFError("the other side of the pipe is gone")
        return json.loads(text)


def client_process() -> None:
    """The subscribers, in a process of their own, driven over stdin/stdout."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_client_main(Pipe(sys.stdin, sys.stdout)))


async def _client_main(conn: Pipe) -> None:
    loop = asyncio.get_running_loop()
    subscribers: list[Subscriber] = []
    while True:
        command, arguments = await loop.run_in_executor(None, conn.recv)
        if command == "subscribe":
            started = time.perf_counter()
            subscribers = await subscribe(**arguments)
            conn.send(("ready", time.perf_counter() - started))
        elif command == "collect":
            expected: list[int] = arguments["ids"]
            deadline = time.monotonic() + arguments["timeout"]
            last = expected[-1] if expected else 0
            while time.monotonic() < deadline and any((s.ids[-1] if s.ids else 0) < last for s in subscribers):
                await asyncio.sleep(0.05)
            wanted = set(expected)
            delivered = lost = duplicated = disordered = 0
            latencies: list[int] = []
            for s in subscribers:
                got = [i for i in s.ids if i in wanted]
                delivered += len(got)
                lost += len(wanted - set(got))
                duplicated += len(got) - len(set(got))
                disordered += any(a >= b for a, b in zip(s.ids, s.ids[1:]))
                latencies += s.latencies
                s.transport.close()
            conn.send(("collected", {
                "delivered": delivered, "lost": lost, "duplicated": duplicated, "disordered": disordered,
                "latencies": sorted(latencies), "last_at": max((s.last_at for s in subscribers), default=0),
            }))
            subscribers = []
        elif command == "stop":
            return


# --- the floor: a bare sse-starlette broadcast -----------------------------------------------


def bare_app():
    """What the activity stream is measured against: sse-starlette as its README shows it,
    broadcasting events published to it from an in-memory list."""
    from sse_starlette.sse import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    published: list[tuple[int, str]] = []
    state = {"new": asyncio.Event()}

    async def stream(request: Request) -> Response:
        async def events():
            at = len(published)
            while True:
                new = state["new"]
                while at < len(published):
                    position, data = published[at]
                    yield ServerSentEvent(data=data, id=str(position))
                    at += 1
                await new.wait()

        return EventSourceResponse(events(), ping=15)

    async def publish(request: Request) -> Response:
        published.append((len(published) + 1, (await request.body()).decode()))
        state["new"].set()
        state["new"] = asyncio.Event()
        return Response(status_code=204)

    return Starlette(routes=[Route("/stream", stream), Route("/publish", publish, methods=["POST"])])


def serve_bare(port: int) -> None:
    import uvicorn

    uvicorn.run(bare_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=3)


# --- processes -------------------------------------------------------------------------------


class Process:
    def __init__(self, argv: list[str], env: dict[str, str], output: Path, ready_url: str):
        self.output = output
        self.log = open(output, "wb")
        self.popen = subprocess.Popen(argv, env={**os.environ, **env}, cwd=ROOT, stdout=self.log,
                                      stderr=subprocess.STDOUT)
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{argv} exited: {output.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code < 500:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{argv} did not start: {output.read_text()[-2000:]}")

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.popen.pid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def start_mission_control(data_dir: Path, port: int) -> tuple[Process, str]:
    env = {"MC_RATE_LIMIT_PER_SECOND": "1000000", "MC_RATE_LIMIT_BURST": "1000000"}
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    process = Process(argv, env, data_dir.parent / f"{data_dir.name}.log", f"http://127.0.0.1:{port}/readyz")
    return process, (data_dir / "admin-token").read_text().strip()


# --- the runs --------------------------------------------------------------------------------


async def paced(rate: float, seconds: float, send) -> int:
    """Starts `send(n)` `rate` times a second for `seconds`, on a schedule that neither drifts nor
    waits for a slow append to finish before starting the next."""
    count = int(rate * seconds)
    loop = asyncio.get_running_loop()
    started = loop.time()
    sending = []
    for n in range(count):
        delay = started + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sending.append(asyncio.create_task(send(n)))
    await asyncio.gather(*sending)
    return count


def fan_out(label: str, conn, port: int, path: str, token: str | None, args, send, ids_after) -> dict:
    """Subscribe, publish at the rate (`send(http, n)`, with an HTTP client to the server),
    collect; returns the figures."""
    conn.send(("subscribe", {"port": port, "path": path, "token": token, "count": args.subscribers}))
    status, seconds = conn.recv()
    line(f"{label}: {args.subscribers:,} subscribed", f"{seconds:.1f} s")
    started = time.time_ns()

    async def publish_all() -> int:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as http:
            return await paced(args.rate, args.seconds, lambda n: send(http, n))

    count = asyncio.run(publish_all())
    ids = ids_after()
    assert len(ids) == count, f"{len(ids)} events published, not {count}"
    conn.send(("collect", {"ids": ids, "timeout": 30}))
    status, figures = conn.recv()
    span = (figures["last_at"] - started) / 1e9
    figures["rate"] = figures["delivered"] / span if span > 0 else 0.0
    figures["expected"] = count * args.subscribers
    return figures


def report(label: str, figures: dict, p99_target: float | None = None) -> None:
    latencies = figures["latencies"]
    line(f"{label}: delivered", f"{figures['delivered']:,}", f"of {figures['expected']:,}")
    line(f"{label}: events lost", f"{figures['lost']:,}",
         f"duplicated {figures['duplicated']}, out of order {figures['disordered']}")
    line(f"{label}: delivered events/s", f"{figures['rate']:,.0f}")
    p50, p99 = percentile(latencies, 0.5) / 1000, percentile(latencies, 0.99) / 1000
    line(f"{label}: latency p50", f"{p50:.1f} ms")
    verdict = "" if p99_target is None else f"(target <= {p99_target:.0f} ms: {'met' if p99 <= p99_target else 'NOT met'})"
    line(f"{label}: latency p99", f"{p99:.1f} ms", verdict)
    line(f"{label}: latency max", f"{latencies[-1] / 1000 if latencies else float('nan'):.1f} ms")


def run_fan_out(args, where: Path) -> None:
    import httpx

    print(f"fan-out: {args.subscribers:,} subscribers in one client process, {args.rate:g} events/s for "
          f"{args.seconds:g} s ({args.subscribers * args.rate:,.0f} deliveries/s); load average before: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    client = subprocess.Popen([sys.executable, __file__, "client"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    parent = Pipe(client.stdout, client.stdin)
    processes: list[Process] = []
    try:
        port = free_port()
        server, token = start_mission_control(where / "fanout", port)
        processes.append(server)
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/mission-control",
                           headers={"Authorization": f"Bearer {token}"}, timeout=30)
        start = api.get("/events", params={"limit": 1}).json()["head"]
        bodies: list[bytes] = []

        async def create(http, n: int) -> None:
            body = {"type": "prompt", "content": f"benchmark event {n}", "title": f"bench {n}",
                    "metadata": {"sentUs": time.time_ns() // 1000}}
            response = await http.post("/api/mission-control/tasks", json=body)
            assert response.status_code == 201, response.text

        appended: list[int] = []  # sent -> recorded, microseconds

        def created() -> list[int]:
            events = [e for e in _all_events(api, start) if e["type"] == "task.created"]
            bodies.extend(json.dumps(e, separators=(",", ":")).encode() for e in events)
            for e in events:
                recorded = datetime.fromisoformat(e["recordedAt"].replace("Z", "+00:00")).timestamp()
                appended.append(int(recorded * 1e6 - e["payload"]["metadata"]["sentUs"]))
            return [e["position"] for e in events]

        cpu, client_cpu = server.cpu_seconds(), _cpu_seconds(client.pid)
        wall = time.perf_counter()
        mc = fan_out("mission-control", parent, port, f"{STREAM_PATH}?after={start}", token, args, create, created)
        wall = time.perf_counter() - wall
        mc_cpu, client_cpu = (server.cpu_seconds() - cpu) / wall, (_cpu_seconds(client.pid) - client_cpu) / wall
        report("mission-control", mc, 100)
        appended.sort()
        line("  of which POST -> recordedAt p50", f"{percentile(appended, 0.5) / 1000:.1f} ms",
             f"p99 {percentile(appended, 0.99) / 1000:.1f} ms (the rest: commit, fan-out, client)")
        line("mission-control: server CPU", f"{mc_cpu * 100:.0f} %", "(of one core, subscribing included)")
        line("mission-control: client CPU", f"{client_cpu * 100:.0f} %", "(the subscribers' process)")
        server.stop()

        port = free_port()
        bare = Process([sys.executable, __file__, "bare", str(port)], {}, where / "bare.log",
                       f"http://127.0.0.1:{port}/nothing")
        processes.append(bare)
        published: list[int] = []

        async def publish(http, n: int) -> None:
            body = _with_sent(bodies[n], time.time_ns() // 1000)
            assert (await http.post("/publish", content=body)).status_code == 204
            published.append(len(published) + 1)  # the floor numbers events as they arrive

        cpu, client_cpu = bare.cpu_seconds(), _cpu_seconds(client.pid)
        wall = time.perf_counter()
        floor = fan_out("bare sse-starlette", parent, port, "/stream", None, args, publish, lambda: published)
        wall = time.perf_counter() - wall
        floor_cpu, client_cpu = (bare.cpu_seconds() - cpu) / wall, (_cpu_seconds(client.pid) - client_cpu) / wall
        report("bare sse-starlette", floor)
        line("bare sse-starlette: server CPU", f"{floor_cpu * 100:.0f} %", "(of one core, subscribing included)")
        line("bare sse-starlette: client CPU", f"{client_cpu * 100:.0f} %", "(the subscribers' process)")
        value = mc["rate"] / floor["rate"] if floor["rate"] else 0.0
        line("delivered events/s, ratio", f"{value:.2f}", f"(target >= 0.80: {'met' if value >= 0.8 else 'NOT met'})")
        lost = "met" if mc["lost"] == 0 and mc["duplicated"] == 0 and mc["disordered"] == 0 else "NOT met"
        line("events lost (mission-control)", f"{mc['lost']:,}", f"(target 0: {lost})")
    finally:
        with contextlib.suppress(Exception):
            parent.send(("stop", None))
        try:
            client.wait(10)
        except subprocess.TimeoutExpired:
            client.kill()
        for process in processes:
            process.stop()


def _with_sent(body: bytes, sent_us: int) -> bytes:
    at = body.find(SENT) + len(SENT)
    stop = at
    while body[stop] in b"0123456789":
        stop += 1
    return body[:at] + str(sent_us).encode() + body[stop:]


def _all_events(api, after: int) -> list[dict]:
    events = []
    while True:
        page = api.get("/events", params={"after": after, "limit": 5000}).json()
        events += page["events"]
        if not page["events"] or page["next"] >= page["head"]:
            return events
        after = page["next"]


async def _fill(path: Path, count: int) -> int:
    """`count` events as a busy log holds them: tasks created, started, and their output."""
    sys.path.insert(0, str(ROOT))
    from events import Meta
    from events.sqlite import SqliteLog
    from events.types import TaskCreated, TaskOutput, TaskStarted
    from projections.readmodels import read_models

    log = SqliteLog(path, durable=False)
    models = read_models(log)
    await log.open()
    try:
        await models.prepare()
        per_task, n = 100, 0
        meta = Meta(actor="bench")
        while n < count:
            task = f"00000000-0000-4000-8000-{n // per_task:012d}"
            events = [
                TaskCreated(task_id=task, type="command", content="make -j2", project_id=task, created_by="bench"),
                TaskStarted(task_id=task, run_id=task, agent_id=task),
            ]
            events += [
                TaskOutput(task_id=task, run_id=task, seq=seq, stream="stdout", chunk=f"line {seq} of the build\n")
                for seq in range(min(per_task, count - n) - 2)
            ]
            await log.append(f"task-{task}", events[: count - n], expected=0, meta=meta)
            n += len(events[: count - n])
        return await log.read_head()
    finally:
        await log.close()


def run_catch_up(args, where: Path) -> None:
    print(f"catch-up: one client reads {args.catchup:,} past events from the start", flush=True)
    data_dir = where / "catchup"
    data_dir.mkdir()
    started = time.perf_counter()
    asyncio.run(_fill(data_dir / "mission-control.db", args.catchup))
    line("filled", f"{time.perf_counter() - started:.1f} s")
    port = free_port()
    server, token = start_mission_control(data_dir, port)
    try:
        async def read() -> tuple[int, float]:
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            started = time.perf_counter()
            request = request_bytes(port, f"{STREAM_PATH}?after=0", token)
            _, protocol = await loop.create_connection(lambda: Subscriber(request, ready, False), "127.0.0.1", port)
            deadline = time.monotonic() + 120
            while (not protocol.ids or protocol.ids[-1] < args.catchup) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            seconds = time.perf_counter() - started
            protocol.transport.close()
            assert protocol.ids[: args.catchup] == list(range(1, args.catchup + 1)), "not the log, in order"
            return len([i for i in protocol.ids if i <= args.catchup]), seconds

        count, seconds = asyncio.run(read())
        per_second = count / seconds
        line("catch-up", f"{per_second:,.0f} ev/s", f"({count:,} in {seconds:.2f} s; "
             f"target >= 50,000: {'met' if per_second >= 50_000 else 'NOT met'})")
    finally:
        server.stop()


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mc-bench-sse-") as tmp:
        where = Path(tmp)
        if args.seconds > 0:
            run_fan_out(args, where)
        if args.catchup > 0:
            run_catch_up(args, where)


if __name__ == "__main__":  # the benchmark's own child processes
    if sys.argv[1:2] == ["bare"]:
        serve_bare(int(sys.argv[2]))
    elif sys.argv[1:2] == ["client"]:
        client_process()
    else:
        sys.exit(f"usage: {sys.argv[0]} bare PORT | client  (the benchmark itself: scripts/bench.py sse)")
else:  # imported by scripts/bench.py
    from bench import command

    command(
        "sse", "the activity stream: 1,000 subscribers (latency, loss) vs bare sse-starlette; catch-up",
        (("--subscribers",), {"type": int, "default": 1000, "help": "concurrent subscribers (default 1,000)"}),
        (("--rate",), {"type": float, "default": 20, "help": "events appended per second (default 20)"}),
        (("--seconds",), {"type": float, "default": 30, "help": "how long to append (default 30; 0 skips)"}),
        (("--catchup",), {"type": int, "default": 100_000,
                          "help": "past events one client reads (default 100,000; 0 skips)"}),
    )(run)
