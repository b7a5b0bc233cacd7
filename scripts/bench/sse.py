"""`bench.py sse`: the activity stream under 1,000 subscribers, against a bare sse-starlette floor.

    .venv/bin/python scripts/bench.py sse [--subscribers 1000] [--rate 20] [--seconds 30] [--catchup 100000]
                                          [--nodes 2] [--backend postgres | --database URL]

1. Fan-out. A real `mission-control serve` (its own process), or `--nodes` of them on one log
   (one PostgreSQL database with --backend postgres or --database, else one SQLite data dir);
   1,000 subscribers in one client process, spread evenly over the nodes (asyncio protocols
   that parse the chunked SSE bytes themselves, so the client is not the bottleneck); tasks
   created over HTTP at `rate`/s, through each node in turn. Each task carries the wall time it
   was sent (metadata.sentUs, in microseconds: the API refuses integers past 2^53), so a
   subscriber knows append->receipt latency on arrival (through another node: the commit's
   NOTIFY and that node's read included). Lost events are those of the log (GET /events) that
   a subscriber did not get.
2. The floor. The same events, at the same rate, through a bare sse-starlette endpoint (its own
   uvicorn process) that broadcasts them from an in-memory list to the same 1,000 clients.
3. Catch-up. One client reads a log of `catchup` past events from the start, from one node on
   SQLite (whatever --nodes and --database say: they are the fan-out's).

Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from events import types as t
from tests.server import API, ROOT, Server, Uvicorn

from tests.server import Nodes

from .common import command, cpu_seconds, database, database_options, fill_log, line, target
from .sse_client import SENT, Pipe, Subscriber, request_bytes

STREAM_PATH = f"{API}/activity/stream"


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


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


def fan_out(label: str, conn, ports: list[int], path: str, token: str | None, args, send, ids_after) -> dict:
    """Subscribe (spread over the servers on `ports`), publish at the rate (`send(http, n)`, with
    an HTTP client to each server in turn), collect; returns the figures."""
    conn.send(("subscribe", {"ports": ports, "path": path, "token": token, "count": args.subscribers}))
    status, seconds = conn.recv()
    line(f"{label}: {args.subscribers:,} subscribed", f"{seconds:.1f} s")
    started = time.time_ns()

    async def publish_all() -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with contextlib.AsyncExitStack() as stack:
            https = [await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30)) for port in ports]
            return await paced(args.rate, args.seconds, lambda n: send(https[n % len(https)], n))

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
    verdict = "" if p99_target is None else f"({target(f'<= {p99_target:.0f} ms', p99 <= p99_target)})"
    line(f"{label}: latency p99", f"{p99:.1f} ms", verdict)
    line(f"{label}: latency max", f"{latencies[-1] / 1000 if latencies else float('nan'):.1f} ms")


def run_fan_out(args, where: Path) -> None:
    client = subprocess.Popen([sys.executable, "-m", "scripts.bench.sse_client"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    parent = Pipe(client.stdout, client.stdin)
    try:
        # Room for every subscriber on one node beside the benchmark's own clients: the cap on
        # connections (MC_MAX_CONNECTIONS, 1,000 by default) is not what is measured either.
        room = {**NO_RATE_LIMIT, "MC_MAX_CONNECTIONS": args.subscribers + 100}
        with database(args) as url, Nodes(where / "fanout", url, room) as nodes:
            on = f"one PostgreSQL database ({url.rpartition('@')[2]})" if url else "one SQLite data dir"
            print(f"fan-out: {args.subscribers:,} subscribers in one client process, {args.rate:g} events/s for "
                  f"{args.seconds:g} s ({args.subscribers * args.rate:,.0f} deliveries/s), "
                  f"{args.nodes} node{'s' * (args.nodes > 1)} on {on}; load average before: "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
            servers = [nodes.start(n) for n in range(args.nodes)]
            mc, bodies = fan_out_mission_control(args, parent, servers, client.pid)
        floor_app = Uvicorn("scripts.bench.floor_sse:app", ROOT, where, "/nothing", "--timeout-graceful-shutdown", "3")
        with floor_app.start() as bare:
            floor = fan_out_floor(args, parent, bare, client.pid, bodies)
        value = mc["rate"] / floor["rate"] if floor["rate"] else 0.0
        line("delivered events/s, ratio", f"{value:.2f}", f"({target('>= 0.80', value >= 0.8)})")
        whole = mc["lost"] == 0 and mc["duplicated"] == 0 and mc["disordered"] == 0
        line("events lost (mission-control)", f"{mc['lost']:,}", f"({target('0', whole)})")
    finally:
        with contextlib.suppress(Exception):
            parent.send(("stop", None))
        try:
            client.wait(10)
        except subprocess.TimeoutExpired:
            client.kill()


NO_RATE_LIMIT = {"MC_RATE_LIMIT_PER_SECOND": 0}  # the per-key rate limit is not what is measured here


def mission_control(data_dir: Path) -> Server:
    """`mission-control serve`, without the per-key rate limit."""
    return Server(data_dir, NO_RATE_LIMIT).start()


def fan_out_mission_control(args, parent: Pipe, servers: list[Server], client_pid: int) -> tuple[dict, list[bytes]]:
    """The figures of the activity stream, and the events it delivered (for the floor to send)."""
    api = servers[0].client()
    start = api.get("/events", params={"limit": 1}).json()["head"]
    bodies: list[bytes] = []

    async def create(http, n: int) -> None:
        body = {"type": "prompt", "content": f"benchmark event {n}", "title": f"bench {n}",
                "metadata": {"sentUs": time.time_ns() // 1000}}
        response = await http.post(f"{API}/tasks", json=body)
        assert response.status_code == 201, response.text

    appended: list[int] = []  # sent -> recorded, microseconds

    def created() -> list[int]:
        events = [e for e in _all_events(api, start) if e["type"] == "task.created"]
        bodies.extend(json.dumps(e, separators=(",", ":")).encode() for e in events)
        for e in events:
            recorded = datetime.fromisoformat(e["recordedAt"].replace("Z", "+00:00")).timestamp()
            appended.append(int(recorded * 1e6 - e["payload"]["metadata"]["sentUs"]))
        return [e["position"] for e in events]

    pids = [server.process.pid for server in servers]
    cpu, client_cpu = sum(map(cpu_seconds, pids)), cpu_seconds(client_pid)
    wall = time.perf_counter()
    mc = fan_out("mission-control", parent, [server.port for server in servers], f"{STREAM_PATH}?after={start}",
                 servers[0].admin_token, args, create, created)
    wall = time.perf_counter() - wall
    mc_cpu, client_cpu = (sum(map(cpu_seconds, pids)) - cpu) / wall, (cpu_seconds(client_pid) - client_cpu) / wall
    report("mission-control", mc, 100)
    appended.sort()
    line("  of which POST -> recordedAt p50", f"{percentile(appended, 0.5) / 1000:.1f} ms",
         f"p99 {percentile(appended, 0.99) / 1000:.1f} ms (the rest: commit, fan-out, client)")
    line("mission-control: server CPU", f"{mc_cpu * 100:.0f} %",
         "(of one core, subscribing included" + (f"; {len(servers)} nodes together)" if len(servers) > 1 else ")"))
    line("mission-control: client CPU", f"{client_cpu * 100:.0f} %", "(the subscribers' process)")
    return mc, bodies


def fan_out_floor(args, parent: Pipe, bare: Uvicorn, client_pid: int, bodies: list[bytes]) -> dict:
    """The same events through the bare sse-starlette broadcast."""
    published: list[int] = []

    async def publish(http, n: int) -> None:
        body = _with_sent(bodies[n], time.time_ns() // 1000)
        assert (await http.post("/publish", content=body)).status_code == 204
        published.append(len(published) + 1)  # the floor numbers events as they arrive

    pid = bare.process.pid
    cpu, client_cpu = cpu_seconds(pid), cpu_seconds(client_pid)
    wall = time.perf_counter()
    floor = fan_out("bare sse-starlette", parent, [bare.port], "/stream", None, args, publish, lambda: published)
    wall = time.perf_counter() - wall
    floor_cpu, client_cpu = (cpu_seconds(pid) - cpu) / wall, (cpu_seconds(client_pid) - client_cpu) / wall
    report("bare sse-starlette", floor)
    line("bare sse-starlette: server CPU", f"{floor_cpu * 100:.0f} %", "(of one core, subscribing included)")
    line("bare sse-starlette: client CPU", f"{client_cpu * 100:.0f} %", "(the subscribers' process)")
    return floor


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


def busy_log(count: int):
    """`count` events as a busy log holds them: tasks created, started, and their output."""
    per_task, n = 100, 0
    while n < count:
        task = f"00000000-0000-4000-8000-{n // per_task:012d}"
        events = [
            t.TaskCreated(task_id=task, type="command", content="make -j2", project_id=task, created_by="bench"),
            t.TaskStarted(task_id=task, run_id=task, agent_id=task),
        ]
        events += [
            t.TaskOutput(task_id=task, run_id=task, seq=seq, stream="stdout", chunk=f"line {seq} of the build\n")
            for seq in range(min(per_task, count - n) - 2)
        ]
        yield f"task-{task}", events[: count - n]
        n += len(events[: count - n])


def run_catch_up(args, where: Path) -> None:
    print(f"catch-up: one client reads {args.catchup:,} past events from the start (one node, SQLite)", flush=True)
    data_dir = where / "catchup"
    data_dir.mkdir()
    started = time.perf_counter()
    asyncio.run(fill_log(data_dir / "mission-control.db", busy_log(args.catchup)))
    line("filled", f"{time.perf_counter() - started:.1f} s")
    with mission_control(data_dir) as server:
        port, token = server.port, server.admin_token

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
             f"{target('>= 50,000', per_second >= 50_000)})")


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mc-bench-sse-") as tmp:
        where = Path(tmp)
        if args.seconds > 0:
            run_fan_out(args, where)
        if args.catchup > 0:
            run_catch_up(args, where)


command(
    "sse", "the activity stream: 1,000 subscribers (latency, loss) vs bare sse-starlette; catch-up",
    (("--subscribers",), {"type": int, "default": 1000, "help": "concurrent subscribers (default 1,000)"}),
    (("--rate",), {"type": float, "default": 20, "help": "events appended per second (default 20)"}),
    (("--seconds",), {"type": float, "default": 30, "help": "how long to append (default 30; 0 skips)"}),
    (("--catchup",), {"type": int, "default": 100_000,
                      "help": "past events one client reads (default 100,000; 0 skips)"}),
    (("--nodes",), {"type": int, "default": 1, "help": "serve processes on one log for the fan-out (default 1)"}),
    *database_options(),
)(run)
