"""`scripts/bench.py desktops`: runs through a remote worker, each figure beside its local floor.

Real `mission-control serve` and `mission-control worker` processes on loopback, fresh data dirs.
1. runs per second at the limit: `echo` runs, the client keeping MC_MAX_CONCURRENT in flight,
   once on the node's own desktop and once through one worker of that capacity (the node's own
   desktop off); from the first `task.started` to the last ending, by their `recordedAt`.
2. output latency: an `exec` agent prints lines, each carrying `time.time_ns()` as it is written;
   an SSE client on the same machine stamps each on receipt (one clock: loopback); p50 and p99,
   through the local desktop and through a worker.
3. the cost of an idle desktop: idle workers for a while; requests per second per worker from the
   server's request counter in `/metrics`, log events per hour per worker from the log head.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.server import API, Server
from tests.worker import Worker, worker_keys

from .common import command, line
from .run import _listen

WORKER_ROUTES = {"register", "poll", "output", "ask", "finish", "drain", "leave"}
PRINTER = """
import sys, time
for i in range({lines}):
    print(f"L {{i}} {{time.time_ns()}}", flush=True)
    time.sleep({pause})
"""


@command(
    "desktops", "runs through a worker beside the local desktop: runs/s at the limit, output latency, idle cost",
    (("--runs",), {"type": int, "default": 500, "help": "echo runs for the runs/s figure (default 500)"}),
    (("--limit",), {"type": int, "default": 5, "help": "MC_MAX_CONCURRENT, and the worker's capacity (default 5)"}),
    (("--lines",), {"type": int, "default": 1000, "help": "lines the exec agent prints (default 1,000)"}),
    (("--idle-workers",), {"type": int, "default": 10, "help": "idle workers (default 10)"}),
    (("--idle-seconds",), {"type": float, "default": 60.0, "help": "how long they idle (default 60)"}),
)
def desktops(args) -> None:
    with tempfile.TemporaryDirectory(prefix="mc-bench-desktops-") as tmp:
        root = Path(tmp)
        print("desktops: through one `mission-control worker` on loopback, beside the node's own desktop")
        print(f"1. {args.runs:,} echo runs at the concurrency limit ({args.limit})")
        floor = _throughput(root / "t-local", args.runs, args.limit, remote=False)
        remote = _throughput(root / "t-worker", args.runs, args.limit, remote=True)
        line("runs/s, local desktop", f"{floor:,.1f} /s", "(the floor)")
        line("runs/s, through a worker", f"{remote:,.1f} /s", f"({remote / floor:.0%} of the floor)")

        print(f"2. output latency, agent write -> SSE receipt, {args.lines:,} lines")
        for remote_ in (False, True):
            where = "through a worker" if remote_ else "local desktop"
            latencies = _latency(root / f"l-{'worker' if remote_ else 'local'}", args.lines, remote_)
            ms = sorted(x / 1e6 for x in latencies)
            line(f"p50, {where}", f"{statistics.median(ms):,.1f} ms", "(the floor)" if not remote_ else "")
            line(f"p99, {where}", f"{ms[int(0.99 * (len(ms) - 1))]:,.1f} ms", f"({len(ms):,} lines)")

        print(f"3. {args.idle_workers} idle workers for {args.idle_seconds:g} s")
        requests, events, poll_seconds = _idle(root / "idle", args.idle_workers, args.idle_seconds)
        line("requests/s per idle worker", f"{requests:.3f} /s", f"(expected 1/pollSeconds = {1 / poll_seconds:.3f})")
        line("log events per hour per idle worker", f"{events:,.1f}", "(expected 0)")


def _server(data_dir: Path, remote: bool, **env) -> Server:
    settings = {"MC_RATE_LIMIT_PER_SECOND": 0, **env}  # the per-key rate limit is not what is measured
    if remote:
        settings["MC_NO_LOCAL_DESKTOP"] = 1
    return Server(data_dir, settings).start()


def _throughput(root: Path, runs: int, limit: int, remote: bool) -> float:
    with _server(root / "data", remote, MC_MAX_CONCURRENT=limit) as server, contextlib.ExitStack() as stack:
        if remote:
            stack.enter_context(Worker(server, "bench", root / "worker", capacity=limit).start())
        return asyncio.run(_drive(server, runs, limit))


async def _drive(server: Server, count: int, limit: int) -> float:
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    async with httpx.AsyncClient(base_url=server.base_url + API, headers=headers, timeout=60) as client:
        agent = (await client.post("/agents", json={"name": "bench-echo", "kind": "echo"})).json()["id"]
        ids = [(await client.post("/tasks", json={"type": "prompt", "content": f"run {n}"})).json()["id"]
               for n in range(count)]
        head = (await client.get("/events", params={"limit": 1})).json()["head"]
        ended = {task_id: asyncio.get_running_loop().create_future() for task_id in ids}
        listening = asyncio.Event()
        listener = asyncio.create_task(_listen(client, head, ended, listening))
        await listening.wait()
        queue = list(reversed(ids))

        async def keep_one_in_flight() -> None:
            while queue:
                task_id = queue.pop()
                run = f"/tasks/{task_id}/run"
                while (answer := await client.post(run, json={"agentId": agent})).status_code == 429:
                    await asyncio.sleep(0.005)  # a slot frees when the log says so: again
                assert answer.status_code == 200, answer.text
                assert await ended[task_id] == "task.completed", task_id

        await asyncio.gather(*(keep_one_in_flight() for _ in range(limit)))
        listener.cancel()
        first = last = None
        after = head
        while True:
            page = (await client.get("/events", params={"after": after, "limit": 5000,
                                                        "types": "task.started,task.completed"})).json()
            for event in page["events"]:
                at = _seconds(event["recordedAt"])
                if event["type"] == "task.started" and first is None:
                    first = at
                if event["type"] == "task.completed":
                    last = at
            if not page["events"]:
                break
            after = page["next"]
    assert first is not None and last is not None
    return count / max(last - first, 1e-6)


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _latency(root: Path, lines: int, remote: bool) -> list[int]:
    with _server(root / "data", remote) as server, contextlib.ExitStack() as stack:
        desktop = "local"
        if remote:
            desktop = "bench"
            stack.enter_context(Worker(server, desktop, root / "worker", agents="exec").start())
        return asyncio.run(_measure(server, lines, desktop))


async def _measure(server: Server, lines: int, desktop: str) -> list[int]:
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    argv = [sys.executable, "-c", PRINTER.format(lines=lines, pause=0.002)]
    async with httpx.AsyncClient(base_url=server.base_url + API, headers=headers, timeout=60) as client:
        printer = {"name": "printer", "kind": "exec", "config": {"argv": argv}}
        agent = (await client.post("/agents", json=printer)).json()
        task = (await client.post("/tasks", json={"type": "prompt", "content": "print", "desktopId": desktop})).json()
        head = (await client.get("/events", params={"limit": 1})).json()["head"]
        latencies: list[int] = []
        params = {"after": head, "types": "task.output,task.completed,task.failed"}
        async with client.stream("GET", "/activity/stream", params=params, timeout=None) as stream:
            started = await client.post(f"/tasks/{task['id']}/run", json={"agentId": agent["id"]})
            assert started.status_code == 200, started.text
            async with asyncio.timeout(120):
                async for text in stream.aiter_lines():
                    now = time.time_ns()
                    if not text.startswith("data:"):
                        continue
                    event = json.loads(text[5:])
                    if event["type"] != "task.output":
                        assert event["type"] == "task.completed", event
                        break
                    for printed in event["payload"]["chunk"].splitlines():
                        if printed.startswith("L "):
                            latencies.append(now - int(printed.split()[2]))
    assert len(latencies) == lines, f"{len(latencies)} of {lines} lines arrived"
    return latencies


def _idle(root: Path, count: int, seconds: float) -> tuple[float, float, float]:
    with _server(root / "data", remote=True) as server, contextlib.ExitStack() as stack:
        names = [f"idle-{n}" for n in range(count)]
        keys = worker_keys(server, names)
        workers = [Worker(server, name, root / name, token=keys[name][1]).spawn() for name in names]
        for worker in workers:
            stack.callback(worker.stop)
        for worker in workers:
            worker.wait_ready(60)
        client = server.client()
        poll_seconds = _poll_seconds(workers[0])
        time.sleep(min(poll_seconds, seconds))  # past the registrations' own requests
        before, head = _worker_requests(server), client.get("/events", params={"limit": 1}).json()["head"]
        time.sleep(seconds)
        after, head_after = _worker_requests(server), client.get("/events", params={"limit": 1}).json()["head"]
    return (after - before) / seconds / count, (head_after - head) / count / seconds * 3600, poll_seconds


def _poll_seconds(worker: Worker) -> float:
    """The pollSeconds the server told the worker, as it logged its registration."""
    registered = next(row for row in worker.output().splitlines() if '"event":"registered"' in row)
    return float(json.loads(registered)["poll_seconds"])


def _worker_requests(server: Server) -> float:
    """The server's count of requests to the worker routes so far."""
    text = server.http().get("/metrics", headers={"Authorization": f"Bearer {server.admin_token}"}).text
    total = 0.0
    for row in text.splitlines():
        if row.startswith("mc_http_requests_total{"):
            labels, _, value = row.rpartition(" ")
            route = labels.partition('route="')[2].partition('"')[0]
            if route.rpartition(".")[2] in WORKER_ROUTES or "worker" in route:
                total += float(value)
    return total
